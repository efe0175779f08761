"""CIFAR-10 in its "python version" batches (``cifar-10-batches-py``)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from collage_inference.data.base import ImageDataset
from collage_inference.errors import DataFormatError, DataNotFoundError

HOW_TO_GET = (
    "download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, "
    "extract it and pass the cifar-10-batches-py folder as --data-dir"
)


def _unpickle(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except FileNotFoundError as exc:
        raise DataNotFoundError(f"{path} does not exist; {HOW_TO_GET}") from exc
    except (pickle.UnpicklingError, EOFError, ValueError, OSError) as exc:
        raise DataFormatError(f"{path} is truncated or not a CIFAR pickle ({exc}); {HOW_TO_GET}") from exc
    if not isinstance(batch, dict):
        raise DataFormatError(f"{path} does not hold a CIFAR batch dictionary")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def load_cifar10(root: Path, split: str) -> ImageDataset:
    """Load the train (data_batch_1..5) or test (test_batch) split."""
    if not root.is_dir():
        raise DataNotFoundError(f"data folder {root} does not exist; {HOW_TO_GET}")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        batch = _unpickle(root / name)
        if "data" not in batch or "labels" not in batch:
            raise DataFormatError(f"{root / name} lacks the 'data' or 'labels' entry")
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(batch["labels"]):
            raise DataFormatError(f"{root / name} data should be (N, 3072) with N labels, got {data.shape}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch["labels"], dtype=np.int64))
    meta = _unpickle(root / "batches.meta") if (root / "batches.meta").exists() else {}
    class_names = tuple(
        n.decode() if isinstance(n, bytes) else str(n) for n in meta.get("label_names", range(10))
    )
    return ImageDataset(
        "cifar10", split, np.concatenate(images), np.concatenate(labels), class_names, str(root)
    )
