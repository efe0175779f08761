"""The encoder: turn a closed group into one collage image.

Encoding in the coding-theory sense: k requests become one redundant query. The layout comes
from :mod:`collage_inference.grid`, the same code training synthesis uses, so the collage-CNN
is served exactly what it learned: each image resized with ``fit_image`` to the model's tile
size, cells row-major (cell = row * S + col), empty cells all-zero black tiles, which the
models were trained to call ``empty`` (class index num_classes). It runs for every group, so it
allocates once and resizes only images that need it (``fit_image`` returns those at tile size untouched).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from collage_inference.errors import ConfigError
from collage_inference.grid import fit_image, pack
from collage_inference.serving.types import Group


@dataclass(frozen=True, eq=False)
class Collage:
    """One encoded group: uint8 pixels (S*t, S*t, C) and each cell's request id (None: empty)."""

    group_id: int
    grid: int
    pixels: np.ndarray
    cells: tuple[str | None, ...]

    @property
    def tile(self) -> int:
        return self.pixels.shape[0] // self.grid


def encode(group: Group, tile: int, channels: int) -> Collage:
    if tile < 1 or channels not in (1, 3):
        raise ConfigError(
            f"a collage needs tile >= 1 and 1 or 3 channels, got tile={tile}, channels={channels}"
        )
    k = group.k
    if len(group.requests) > k:
        raise ConfigError(f"group {group.id} holds {len(group.requests)} requests, more than k={k}")
    tiles = np.zeros((k, tile, tile, channels), np.uint8)  # (k, t, t, C); empty cells stay black
    for cell, request in enumerate(group.requests):
        tiles[cell] = fit_image(request.image, tile, channels)
    pixels = pack(tiles, group.grid)  # (S*t, S*t, C)
    cells = group.request_ids + (None,) * (k - len(group.requests))
    return Collage(group.id, group.grid, pixels, cells)


class CollageEncoder:
    """Encodes groups for the collage models being served: one tile size per grid."""

    def __init__(self, tiles: Mapping[int, int], channels: int) -> None:
        if not tiles:
            raise ConfigError("the encoder needs at least one collage grid with its tile size")
        self.tiles = dict(tiles)
        self.channels = channels

    @property
    def grids(self) -> tuple[int, ...]:
        """The grids a collage model is served for: what the grouper may choose from."""
        return tuple(sorted(self.tiles))

    def encode(self, group: Group) -> Collage:
        tile = self.tiles.get(group.grid)
        if tile is None:
            raise ConfigError(
                f"no collage model serves a {group.grid}x{group.grid} grid (have {self.grids}); "
                "limit the grouper's grids to these"
            )
        return encode(group, tile, self.channels)
