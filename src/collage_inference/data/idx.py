"""MNIST-style IDX files (Fashion-MNIST, MNIST, KMNIST ...), plain or gzipped."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from collage_inference.data.base import ImageDataset
from collage_inference.errors import DataFormatError, DataNotFoundError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
HOW_TO_GET = (
    "install Debian's package (`sudo apt-get install dataset-fashion-mnist`, files land in "
    f"{FASHION_MNIST_DIR}) or put the four *-idx?-ubyte[.gz] files in a folder and pass --data-dir"
)
_PREFIX = {"train": "train", "test": "t10k"}
_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally .gz) into an array, checking its header against its size."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError as exc:
        raise DataNotFoundError(f"{path} does not exist; {HOW_TO_GET}") from exc
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataFormatError(f"{path} is not a readable gzip file ({exc}); download it again") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES or raw[3] == 0:
        raise DataFormatError(f"{path} has no IDX magic number; is it really an IDX file?")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFormatError(f"{path} is truncated inside its header; download it again")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_DTYPES[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise DataFormatError(
            f"{path} should hold {expected} bytes for shape {shape} but holds {len(raw)}: "
            "the file is truncated or corrupt; download it again"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem, stem.replace("-idx", ".idx")):
        if (root / name).exists():
            return root / name
    raise DataNotFoundError(f"{root / (stem + '.gz')} does not exist; {HOW_TO_GET}")


def load_idx(
    root: Path, split: str, name: str = "idx", class_names: tuple[str, ...] | None = None
) -> ImageDataset:
    """Load ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` from ``root``.

    Class names come from ``root/classes.txt`` (one per line) when present.
    """
    if not root.is_dir():
        raise DataNotFoundError(f"data folder {root} does not exist; {HOW_TO_GET}")
    prefix = _PREFIX[split]
    images_path = _find(root, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(root, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataFormatError(f"{images_path} must hold uint8 images (N, H, W), got {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataFormatError(
            f"{labels_path} holds {labels.shape} labels for {len(images)} images in {images_path}"
        )
    classes_file = root / "classes.txt"
    if class_names is None and classes_file.exists():
        class_names = tuple(line.strip() for line in classes_file.read_text().splitlines() if line.strip())
    if class_names is None:
        class_names = tuple(str(i) for i in range(int(labels.max()) + 1))
    return ImageDataset(
        name, split, images[:, :, :, None].copy(), labels.astype(np.int64), class_names, str(root)
    )
