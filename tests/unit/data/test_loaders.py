import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from collage_inference.data import load_dataset
from collage_inference.data.idx import read_idx
from collage_inference.errors import ConfigError, DataFormatError, DataNotFoundError


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.fixture
def idx_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 6)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 5, 5)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 3)
    (tmp_path / "classes.txt").write_text("cat\ndog\nbird\n")
    return tmp_path


def test_idx_loads_with_class_names(idx_dir):
    ds = load_dataset("idx", "train", idx_dir)
    assert ds.images.shape == (12, 5, 5, 1) and ds.images.dtype == np.uint8
    assert ds.class_names == ("cat", "dog", "bird") and ds.labels.tolist() == [0, 1, 2] * 4
    assert len(ds.fingerprint) == 16 and ds.fingerprint != load_dataset("idx", "test", idx_dir).fingerprint


def test_idx_plain_files_load_too(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 3, 3)), compress=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 1]), compress=False)
    assert load_dataset("idx", "test", tmp_path).class_names == ("0", "1")


def test_idx_truncated_file_names_the_file(idx_dir):
    path = idx_dir / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-7]))
    with pytest.raises(DataFormatError, match=r"train-images-idx3-ubyte\.gz.*truncated"):
        load_dataset("idx", "train", idx_dir)


def test_idx_corrupt_gzip_and_bad_magic(idx_dir):
    (idx_dir / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataFormatError, match="gzip"):
        load_dataset("idx", "train", idx_dir)
    bad = idx_dir / "x.idx"
    bad.write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(DataFormatError, match="magic"):
        read_idx(bad)


def test_idx_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(DataNotFoundError, match="dataset-fashion-mnist"):
        load_dataset("idx", "train", tmp_path)
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_dataset("fashion-mnist", "train", tmp_path / "nowhere")


def test_idx_label_count_mismatch(idx_dir):
    write_idx(idx_dir / "t10k-labels-idx1-ubyte.gz", np.arange(4) % 3)
    with pytest.raises(DataFormatError, match="labels"):
        load_dataset("idx", "test", idx_dir)


def _cifar_batch(path: Path, n: int, rng) -> None:
    data = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(np.arange(n) % 10)}
    path.write_bytes(pickle.dumps(data))


@pytest.fixture
def cifar_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        _cifar_batch(tmp_path / f"data_batch_{i}", 4, rng)
    _cifar_batch(tmp_path / "test_batch", 3, rng)
    names = [
        n.encode() for n in ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    ]
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    return tmp_path


def test_cifar_loads_channels_last(cifar_dir):
    ds = load_dataset("cifar10", "train", cifar_dir)
    assert ds.images.shape == (20, 32, 32, 3) and ds.class_names[1] == "car"
    raw = pickle.loads((cifar_dir / "data_batch_1").read_bytes())[b"data"][0]
    np.testing.assert_array_equal(ds.images[0, :, :, 0].ravel(), raw[:1024])  # red plane first


def test_cifar_errors(cifar_dir):
    (cifar_dir / "test_batch").write_bytes(b"\x80\x04 truncated")
    with pytest.raises(DataFormatError, match="test_batch"):
        load_dataset("cifar10", "test", cifar_dir)
    (cifar_dir / "data_batch_3").unlink()
    with pytest.raises(DataNotFoundError, match="data_batch_3"):
        load_dataset("cifar10", "train", cifar_dir)


def _image(path: Path, size: tuple[int, int], mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, 128).save(path)


def test_imagefolder_resizes_any_size_and_mixes_modes(tmp_path):
    _image(tmp_path / "train" / "cat" / "a.png", (20, 20))
    _image(tmp_path / "train" / "cat" / "b.jpg", (31, 17), "RGB")
    _image(tmp_path / "train" / "dog" / "c.png", (8, 8))
    ds = load_dataset("imagefolder", "train", tmp_path, image_size=16)
    assert ds.images.shape == (3, 16, 16, 3)
    assert ds.class_names == ("cat", "dog") and ds.labels.tolist() == [0, 0, 1]


def test_imagefolder_all_grayscale_stays_one_channel(tmp_path):
    _image(tmp_path / "test" / "a" / "1.png", (10, 12))
    _image(tmp_path / "test" / "b" / "2.png", (10, 10))
    ds = load_dataset("imagefolder", "test", tmp_path)
    assert ds.images.shape == (2, 12, 12, 1)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataNotFoundError, match="root/<split>/<class>"):
        load_dataset("imagefolder", "train", tmp_path)
    _image(tmp_path / "train" / "cat" / "a.png", (8, 8))
    (tmp_path / "train" / "dog").mkdir()
    with pytest.raises(DataFormatError, match="dog holds no"):
        load_dataset("imagefolder", "train", tmp_path)
    (tmp_path / "train" / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataFormatError, match="broken.png"):
        load_dataset("imagefolder", "train", tmp_path)


def test_unknown_kind_and_split():
    with pytest.raises(ConfigError, match="unknown dataset kind"):
        load_dataset("svhn", "train", "/tmp")
    with pytest.raises(ConfigError, match="split"):
        load_dataset("fashion-mnist", "validation")
