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
