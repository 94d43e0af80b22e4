"""Captioned Fashion-MNIST: the offline text-to-image data of the demo model (issue: real results II).

Each image gets a caption from its class name and one of a few templates ("a photo of a sneaker", "a black
and white picture of an ankle boot", ...), chosen by the image's index so the data set is fixed. They are
written as webdataset tar shards (``000000.png`` + ``000000.txt`` per sample, read by train/core/caption_data.py),
so VAE, teacher and LCM training all read the same files, and a small subset can ship with the toolkit.
"""
from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

from atdiff.eval.fashion_prompts import caption
from atdiff.runtime.errors import ToolkitError

# what write_shards names its files (and their temporary names): the only files it ever replaces
SHARD_NAME = re.compile(r"fmnist-[a-z]+-\d{3}\.tar(\.tmp)?")


def check_shard_folder(out: Path) -> None:
    """``out`` must be new, empty, or a folder of these shards (any split): rewriting a shard replaces a file of
    the same name, which must not be someone else's."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise ToolkitError(f"--out {out} is a file; pass a folder for the shards")
    others = sorted(p.name for p in out.iterdir() if not (p.is_file() and SHARD_NAME.fullmatch(p.name)))
    if others:
        raise ToolkitError(f"--out {out} holds {others[0]}, which is not a shard this command wrote "
                           "(fmnist-SPLIT-NNN.tar); nothing was written: choose a new or empty folder")


def write_shards(out: Path, *, split: str = "train", num: int | None = None, resolution: int = 32,
                 per_shard: int = 10000) -> list[Path]:
    """Write the first ``num`` images of ``split`` (all by default), resized to ``resolution`` (bicubic, as
    ``toolkit train adm --resolution`` does) as RGB PNGs with captions, into ``out/fmnist-{split}-NNN.tar``."""
    from PIL import Image

    from atdiff.eval.sources import dataset_labels, dataset_source
    check_shard_folder(out)   # before the data loads
    images, labels = dataset_source("fashion-mnist", split).images, dataset_labels("fashion-mnist", split)
    num = len(images) if num is None else num
    if not 1 <= num <= len(images):
        raise ToolkitError(f"--num must be between 1 and {len(images)}, got {num}")
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for first in range(0, num, per_shard):
        path = out / f"fmnist-{split}-{first // per_shard:03d}.tar"
        tmp = path.with_suffix(".tar.tmp")
        with tarfile.open(tmp, "w") as tar:
            for i in range(first, min(first + per_shard, num)):
                image = Image.fromarray(images[i]).resize((resolution, resolution), Image.BICUBIC).convert("RGB")
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                _add(tar, f"{i:06d}.png", buffer.getvalue())
                _add(tar, f"{i:06d}.txt", caption(int(labels[i]), i).encode())
        tmp.replace(path)
        shards.append(path)
    return shards


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible bytes: the latent cache and fingerprints key on them
    tar.addfile(info, io.BytesIO(data))


def register(app) -> None:
    import typer

    from atdiff.runtime.errors import handles_errors

    @app.command("captions")
    @handles_errors
    def captions(out: Path = typer.Option(Path("data/fmnist-captions"), help="Folder for the .tar shards."),
                 split: str = typer.Option("train", help="train | test"),
                 num: int = typer.Option(None, help="Only the first NUM images (default: the whole split)."),
                 resolution: int = typer.Option(32, help="Image size (bicubic from 28x28).")) -> None:
        """Write captioned Fashion-MNIST as webdataset shards for `toolkit train vae / teacher / lcm / lcm-at`."""
        shards = write_shards(out, split=split, num=num, resolution=resolution)
        typer.echo(f"wrote {len(shards)} shard(s) to {out}; pass --data '{out}/*.tar'")
