"""Training and evaluation collages, synthesised on the fly from any dataset.

Tiles are the dataset's images resized once to the collage model's tile size (with the same
:func:`~collage_inference.grid.fit_images` the serving encoder uses) and packed with
:func:`~collage_inference.grid.pack`, so per-cell labels line up with tiles by construction.
Empty cells hold black tiles and the extra class ``empty`` (index ``num_classes``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from collage_inference.errors import ConfigError
from collage_inference.grid import pack

EMPTY_SOURCE = -1


@dataclass(frozen=True)
class CollageBatch:
    """collages: (B, S*t, S*t, C) uint8; labels: (B, k) with ``empty`` = num_classes;
    sources: (B, k) index of the dataset image in each cell, ``EMPTY_SOURCE`` for empty cells."""

    collages: np.ndarray
    labels: np.ndarray
    sources: np.ndarray


def augment(images: np.ndarray, rng: np.random.Generator, max_shift: int, flip: bool = True) -> np.ndarray:
    """Random horizontal flips and translations of up to ``max_shift`` pixels (zero fill).

    images: (N, H, W, C) uint8; returns a new array of the same shape.
    """
    out = images.copy()
    if flip:
        flipped = rng.random(len(images)) < 0.5
        out[flipped] = out[flipped, :, ::-1]
    if max_shift > 0:
        n, h, w, _ = images.shape
        padded = np.pad(out, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
        dy = rng.integers(0, 2 * max_shift + 1, n)
        dx = rng.integers(0, 2 * max_shift + 1, n)
        for oy in range(2 * max_shift + 1):  # one slice per offset pair, vectorised over images
            for ox in range(2 * max_shift + 1):
                sel = np.flatnonzero((dy == oy) & (dx == ox))
                if len(sel):
                    out[sel] = padded[sel, oy : oy + h, ox : ox + w]
    return out


class CollageSynthesizer:
    """Draws random collages from a pool of tiles; deterministic for a given generator.

    empty_prob is the chance that a collage is partial; a partial collage has between 1 and
    k - 1 empty cells at random positions, as a group that closed on its deadline would.
    """

    def __init__(
        self,
        tiles: np.ndarray,
        labels: np.ndarray,
        grid: int,
        num_classes: int,
        empty_prob: float = 0.3,
        max_shift: int = 0,
        flip: bool = False,
    ) -> None:
        if not 0.0 <= empty_prob <= 1.0:
            raise ConfigError(f"empty_prob must lie in [0, 1], got {empty_prob}")
        if len(tiles) != len(labels) or not len(tiles):
            raise ConfigError(
                f"need as many tiles as labels and at least one, got {len(tiles)}/{len(labels)}"
            )
        self.tiles, self.labels = tiles, labels
        self.grid, self.k = grid, grid * grid
        self.empty_class = num_classes
        self.empty_prob, self.max_shift, self.flip = empty_prob, max_shift, flip

    def sample(self, batch_size: int, rng: np.random.Generator) -> CollageBatch:
        sources = rng.integers(0, len(self.tiles), (batch_size, self.k))
        if self.k > 1:
            partial = rng.random(batch_size) < self.empty_prob
            n_empty = rng.integers(1, self.k, batch_size)
            ranks = rng.random((batch_size, self.k)).argsort(axis=1).argsort(axis=1)
            sources[partial[:, None] & (ranks < n_empty[:, None])] = EMPTY_SOURCE
        return self._build(sources, rng)

    def _build(self, sources: np.ndarray, rng: np.random.Generator | None) -> CollageBatch:
        flat = sources.reshape(-1)
        tiles = self.tiles[np.maximum(flat, 0)]
        if rng is not None and (self.max_shift or self.flip):
            tiles = augment(tiles, rng, self.max_shift, self.flip)
        tiles[flat == EMPTY_SOURCE] = 0
        labels = np.where(flat == EMPTY_SOURCE, self.empty_class, self.labels[np.maximum(flat, 0)])
        b = len(sources)
        collages = pack(tiles.reshape(b, self.k, *tiles.shape[1:]), self.grid)
        return CollageBatch(collages, labels.reshape(b, self.k), sources)

    def evaluation_sources(self, seed: int, partial: bool) -> np.ndarray:
        """Cell sources that use every image exactly once, in a fixed shuffled order.

        Full collages: images fill k cells each; the last collage wraps around to the start and
        its wrapped cells are marked empty so every image is scored once. Partial collages hold
        between 1 and k - 1 images, filled at random positions.
        """
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(self.tiles))
        if not partial or self.k == 1:
            count = -(-len(order) // self.k)
            padded = np.full(count * self.k, EMPTY_SOURCE)
            padded[: len(order)] = order
            return padded.reshape(count, self.k)
        rows, start = [], 0
        while start < len(order):
            n = int(min(rng.integers(1, self.k), len(order) - start))
            row = np.full(self.k, EMPTY_SOURCE)
            row[rng.choice(self.k, n, replace=False)] = order[start : start + n]
            rows.append(row)
            start += n
        return np.stack(rows)

    def build(self, sources: np.ndarray) -> CollageBatch:
        """Collages for explicit cell sources (no augmentation)."""
        return self._build(sources, None)
