"""The one dataset interface every loader returns."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from collage_inference.errors import DataFormatError


@dataclass(frozen=True)
class ImageDataset:
    """One split of a labelled image dataset, held in memory.

    images: (N, H, W, C) uint8, channels-last; labels: (N,) int64 in [0, len(class_names)).
    """

    name: str
    split: str
    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise DataFormatError(
                f"{self.name}/{self.split}: images must be uint8 (N, H, W, C), "
                f"got {self.images.dtype} {self.images.shape}"
            )
        if len(self.images) != len(self.labels):
            raise DataFormatError(
                f"{self.name}/{self.split}: {len(self.images)} images but {len(self.labels)} labels"
            )
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise DataFormatError(
                f"{self.name}/{self.split}: labels must lie in 0..{len(self.class_names) - 1}, "
                f"found {int(self.labels.min())}..{int(self.labels.max())}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    @property
    def channels(self) -> int:
        return int(self.images.shape[3])

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of pixels, labels and class names: ties a checkpoint to its data."""
        h = hashlib.sha256()
        h.update(str(self.images.shape).encode())
        h.update(np.ascontiguousarray(self.images).tobytes())
        h.update(self.labels.astype(np.int64).tobytes())
        h.update("\n".join(self.class_names).encode())
        return h.hexdigest()[:16]

    def subset(self, indices: np.ndarray) -> ImageDataset:
        """A new dataset with only the given rows (same class names)."""
        return ImageDataset(
            self.name, self.split, self.images[indices], self.labels[indices], self.class_names, self.source
        )

    def stratified(self, count: int, seed: int) -> tuple[ImageDataset, ImageDataset]:
        """(``count`` rows drawn at random within each class, the other rows), both in their
        original order. Each class gets its share of ``count`` (largest remainders), so a
        dataset stored class by class, as an image folder is, yields every class."""
        if not 0 <= count <= len(self):
            raise DataFormatError(f"{self.name}/{self.split}: cannot take {count} of {len(self)} images")
        rng = np.random.default_rng(seed)
        classes, sizes = np.unique(self.labels, return_counts=True)
        exact = sizes * (count / len(self)) if len(self) else sizes * 0.0
        take = np.floor(exact).astype(np.int64)
        take[np.argsort(take - exact, kind="stable")[: count - int(take.sum())]] += 1
        chosen = np.zeros(len(self), bool)
        for label, n in zip(classes, take, strict=True):
            chosen[rng.choice(np.flatnonzero(self.labels == label), n, replace=False)] = True
        return self.subset(np.flatnonzero(chosen)), self.subset(np.flatnonzero(~chosen))
