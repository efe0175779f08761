"""Datasets behind one interface: :func:`load_dataset` returns an :class:`ImageDataset`.

Kinds: ``fashion-mnist`` (IDX files, Debian's package by default), ``idx`` (any MNIST-style
IDX folder), ``cifar10`` (python batches) and ``imagefolder`` (one folder per class).
Nothing is downloaded: a missing file raises an error that says how to get it.
"""

from __future__ import annotations

from pathlib import Path

from collage_inference.data.base import ImageDataset
from collage_inference.data.cifar import load_cifar10
from collage_inference.data.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, load_idx
from collage_inference.data.imagefolder import load_imagefolder
from collage_inference.errors import ConfigError

DATASET_KINDS = ("fashion-mnist", "idx", "cifar10", "imagefolder")
SPLITS = ("train", "test")

__all__ = ["DATASET_KINDS", "ImageDataset", "load_dataset"]


def load_dataset(
    kind: str, split: str, data_dir: Path | str | None = None, image_size: int | None = None
) -> ImageDataset:
    """Load one split of a dataset of the given kind from ``data_dir``."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    root = Path(data_dir) if data_dir is not None else None
    if kind == "fashion-mnist":
        return load_idx(root or FASHION_MNIST_DIR, split, "fashion-mnist", FASHION_MNIST_CLASSES)
    if root is None:
        raise ConfigError(f"dataset kind {kind!r} needs --data-dir")
    if kind == "idx":
        return load_idx(root, split, root.name)
    if kind == "cifar10":
        return load_cifar10(root, split)
    if kind == "imagefolder":
        return load_imagefolder(root, split, image_size)
    raise ConfigError(f"unknown dataset kind {kind!r}; choose one of {', '.join(DATASET_KINDS)}")
