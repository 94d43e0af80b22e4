"""Image-caption pairs for LCM distillation, as a map-style dataset (the trainer's exact resume needs
``len`` and indexing).

``--data`` may be:
- an image folder with ``metadata.jsonl`` (Hugging Face imagefolder convention: one JSON object a line
  with ``file_name``, relative to the folder, and ``text``); every image in the folder needs a caption;
- webdataset tar shards: a ``.tar`` file, a folder of them, or a glob (``shards/*.tar``); a sample is
  the members sharing a key (``0001.jpg`` + ``0001.txt``/``.caption``/``.json`` with ``text``/``caption``).

Tars are indexed with the standard ``tarfile`` module (member offsets), not the ``webdataset`` package:
webdataset streams (an IterableDataset), which cannot give the trainer's per-step batch order.

Items: ``{"pixel_values": float32 [3, R, R] in [-1, 1], "input_ids": int64 [L]}``; images are resized and
center-cropped to R (so a latent cache is deterministic).

The optional cache (``--cache-latents DIR``) stores, per sample, the VAE posterior's moments (mean and
log-variance, so training still samples the latent as diffusers does) and the caption's text embeddings,
in float16 safetensors chunks: on real data this removes the VAE encoder and text encoder from every step.
Its manifest records a key (data fingerprint, resolution, hashes of the teacher's VAE / text encoder /
tokenizer files); a cache made for other data or another teacher is refused, never silently reused.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import torch

from atdiff.runtime.errors import ToolkitError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
CAPTION_SUFFIXES = (".txt", ".caption", ".text")


@dataclasses.dataclass(frozen=True)
class Record:
    """Where one image lives (a file, or a byte range of a tar shard) and its caption."""
    source: str
    caption: str
    offset: int = -1     # >= 0: a tar member's data offset
    size: int = -1

    def read(self) -> bytes:
        if self.offset < 0:
            return Path(self.source).read_bytes()
        with open(self.source, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


def find_records(data: str) -> list[Record]:
    """All (image, caption) records of ``--data``; any image without a caption is a ToolkitError."""
    path = Path(data).expanduser()
    if path.is_dir() and (path / "metadata.jsonl").exists():
        records = _imagefolder(path)
    elif path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if not shards:
            raise ToolkitError(f"--data {data} has neither metadata.jsonl nor .tar shards; give image-caption "
                               "pairs as a folder with metadata.jsonl ({\"file_name\", \"text\"} per line) "
                               "or webdataset tars")
        records = [r for s in shards for r in _tar_shard(s)]
    elif path.is_file() and path.suffix == ".tar":
        records = _tar_shard(path)
    elif any(ch in data for ch in "*?["):
        shards = sorted(Path(p) for p in glob.glob(str(path)))
        if not shards:
            raise ToolkitError(f"--data {data} matches no files; check the glob")
        records = [r for s in shards for r in _tar_shard(s)]
    else:
        raise ToolkitError(f"--data {data} does not exist or is not a caption dataset; pass a folder with "
                           "metadata.jsonl or webdataset .tar shards")
    if not records:
        raise ToolkitError(f"--data {data} holds no image-caption pairs")
    return records


def _imagefolder(root: Path) -> list[Record]:
    captions: dict[str, str] = {}
    for n, line in enumerate((root / "metadata.jsonl").read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            name, text = entry["file_name"], entry["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ToolkitError(f"{root}/metadata.jsonl line {n} is not a JSON object with 'file_name' and 'text'; "
                               "fix that line") from None
        if not isinstance(text, str) or not text.strip():
            raise ToolkitError(f"{root}/metadata.jsonl line {n}: empty caption for {name}; give every image a text")
        if not (root / name).is_file():
            raise ToolkitError(f"{root}/metadata.jsonl line {n} names {name}, which does not exist; fix or remove it")
        captions[Path(name).as_posix()] = text
    images = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                    if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    missing = [name for name in images if name not in captions]
    if missing:
        raise ToolkitError(f"{len(missing)} image(s) in {root} have no caption in metadata.jsonl (e.g. {missing[0]}); "
                           "add a {\"file_name\", \"text\"} line for each, or move them out of the folder")
    return [Record(str(root / name), captions[name]) for name in images]


def _tar_shard(shard: Path) -> list[Record]:
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(shard, "r:") as tar:  # uncompressed only: records are byte ranges of the file
            for member in tar:
                if member.isfile() and (split := _sample_key(member.name)):
                    key, ext = split
                    samples.setdefault(key, {})["." + ext.lower()] = member
            records = [_tar_record(shard, tar, key, members) for key, members in samples.items()]
    except tarfile.TarError as exc:
        raise ToolkitError(f"cannot read shard {shard} ({exc}); webdataset shards must be uncompressed .tar") from None
    return [r for r in records if r is not None]


# webdataset's rule (``base_plus_ext``): the key is the path up to the first dot of the file name, so
# ``./0001.jpg`` (``tar -C dir .``) and ``a.b/0001.jpg`` split at the name, not at the first dot of the path.
_KEY_AND_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def _sample_key(member_name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member, or None for a name without an extension."""
    match = _KEY_AND_EXT.match(member_name)
    return (match.group(1), match.group(2)) if match else None


def _tar_record(shard: Path, tar: tarfile.TarFile, key: str, members: dict) -> Record | None:
    image = next((members[e] for e in members if e in IMAGE_SUFFIXES), None)
    if image is None:
        return None  # e.g. a metadata-only sample
    caption = None
    for ext in CAPTION_SUFFIXES:
        if ext in members:
            caption = tar.extractfile(members[ext]).read().decode("utf-8")
            break
    if caption is None and ".json" in members:
        meta = json.loads(tar.extractfile(members[".json"]).read())
        caption = meta.get("text") or meta.get("caption") if isinstance(meta, dict) else None
    if not caption or not caption.strip():
        raise ToolkitError(f"sample {key} in {shard} has an image but no caption (.txt/.caption or json 'text'); "
                           "add one or remove the sample")
    return Record(str(shard), caption.strip(), image.offset_data, image.size)


def fingerprint(records: list[Record]) -> str:
    """A hash of what the data is (sources, byte ranges, sizes, captions), for the latent cache's key."""
    h = hashlib.sha256()
    for r in records:
        size = r.size if r.offset >= 0 else Path(r.source).stat().st_size
        h.update(json.dumps([Path(r.source).name, r.offset, size, r.caption]).encode())
    return h.hexdigest()


class CaptionDataset(torch.utils.data.Dataset):
    """Decoded, resized images and tokenized captions."""

    def __init__(self, records: list[Record], tokenizer, resolution: int):
        self.records, self.tokenizer, self.resolution = records, tokenizer, resolution

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.image(i), "input_ids": self.tokenize([self.records[i].caption])[0]}

    def image(self, i: int) -> torch.Tensor:
        from PIL import Image, ImageOps
        record = self.records[i]
        try:
            with Image.open(io.BytesIO(record.read())) as im:
                im = ImageOps.fit(im.convert("RGB"), (self.resolution,) * 2, Image.Resampling.BILINEAR)
                array = np.asarray(im)
        except OSError as exc:
            raise ToolkitError(f"cannot decode image {record.source} (offset {record.offset}): {exc}") from None
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1.0

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids


CACHE_VERSION = 1
CACHE_FORMAT = "at-diffusion-toolkit/latent-cache"
CHUNK = 256  # samples per safetensors file


def cache_key(records: list[Record], resolution: int, teacher_path: Path) -> dict:
    h = hashlib.sha256()
    for part in ("vae", "text_encoder", "tokenizer"):
        for f in sorted((teacher_path / part).rglob("*")):
            if f.is_file():
                h.update(f.relative_to(teacher_path).as_posix().encode())
                with open(f, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 24), b""):
                        h.update(block)
    return {"version": CACHE_VERSION, "data": fingerprint(records), "resolution": resolution,
            "teacher_components": h.hexdigest(), "num_samples": len(records)}


def open_or_build_cache(cache_dir: str | Path, dataset: CaptionDataset, key: dict, encode, batch_size: int = 16):
    """The cached dataset in ``cache_dir``, building it first if the dir is absent or empty.
    ``encode(pixel_values, input_ids) -> (moments, prompt_embeds)`` runs the frozen VAE and text encoder."""
    from atdiff.runtime.staging import staged_directory
    cache_dir = Path(cache_dir)
    manifest = cache_dir / "manifest.json"
    if manifest.exists():   # only read: a cache is reused when its key matches exactly, and never rewritten
        found = _read_json(manifest)
        if not isinstance(found, dict) or "key" not in found:
            raise ToolkitError(f"--cache-latents {cache_dir} is not a latent cache (its manifest.json is not one "
                               "this toolkit wrote); pass a new directory")
        if found["key"] != key:
            raise ToolkitError(f"--cache-latents {cache_dir} was made for other data, resolution or teacher "
                               f"components; delete it or pass a new directory")
        return CachedDataset(cache_dir, found)
    if cache_dir.exists() and (not cache_dir.is_dir() or any(cache_dir.iterdir())):
        raise ToolkitError(f"--cache-latents {cache_dir} is not empty and has no manifest.json (another folder); "
                           "pass a new directory")
    # built beside it under a unique name and renamed into place: an interrupted build leaves the directory as it
    # was, and only the build's own leftovers (.NAME.partial-PID-*, of dead processes) are ever removed
    with staged_directory(cache_dir, "manifest.json", "latent cache") as tmp:
        _write_chunks(tmp, dataset, encode, batch_size)
        (tmp / "manifest.json").write_text(json.dumps({"format": CACHE_FORMAT, "key": key, "chunk": CHUNK,
                                                       "dtype": "float16"}, indent=2))
    return CachedDataset(cache_dir, json.loads(manifest.read_text()))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None


@torch.no_grad()
def _write_chunks(out: Path, dataset: CaptionDataset, encode, batch_size: int) -> None:
    from safetensors.torch import save_file
    for start in range(0, len(dataset), CHUNK):
        moments, embeds = [], []
        for b in range(start, min(start + CHUNK, len(dataset)), batch_size):
            idx = range(b, min(b + batch_size, start + CHUNK, len(dataset)))
            pixels = torch.stack([dataset.image(i) for i in idx])
            ids = dataset.tokenize([dataset.records[i].caption for i in idx])
            m, e = encode(pixels, ids)
            moments.append(m.half().cpu())
            embeds.append(e.half().cpu())
        save_file({"moments": torch.cat(moments).contiguous(), "prompt_embeds": torch.cat(embeds).contiguous()},
                  str(out / f"chunk-{start // CHUNK:06d}.safetensors"))


class CachedDataset(torch.utils.data.Dataset):
    """Items ``{"latent_moments": [2C, h, w], "prompt_embeds": [L, D]}`` (float16 on disk, float32 out)."""

    def __init__(self, cache_dir: Path, manifest: dict):
        self.dir, self.chunk = Path(cache_dir), int(manifest["chunk"])
        self.n = int(manifest["key"]["num_samples"])
        self._open: dict[int, object] = {}  # safetensors handles, opened lazily per process/worker

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        from safetensors import safe_open
        c, j = divmod(i, self.chunk)
        if c not in self._open:
            self._open[c] = safe_open(str(self.dir / f"chunk-{c:06d}.safetensors"), framework="pt")
        f = self._open[c]
        return {"latent_moments": f.get_slice("moments")[j:j + 1][0].float(),
                "prompt_embeds": f.get_slice("prompt_embeds")[j:j + 1][0].float()}

    def __getstate__(self):  # safetensors handles do not pickle (DataLoader workers reopen them)
        return {**self.__dict__, "_open": {}}
