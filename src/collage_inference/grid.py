"""Collage geometry: pack S x S tiles into one image and split it back into cells.

Pure NumPy and shared by training synthesis and the serving encoder, so the collage-CNN is
always served exactly the layout it was trained on. Images are channels-last, (H, W, C).
Cells are numbered row-major: ``cell = row * S + col``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from collage_inference.errors import GeometryError


def cell_index(row: int, col: int, grid: int) -> int:
    """Row-major index of the cell at (row, col) in an S x S grid."""
    if not (0 <= row < grid and 0 <= col < grid):
        raise GeometryError(f"cell ({row}, {col}) is outside a {grid}x{grid} grid")
    return row * grid + col


def cell_position(cell: int, grid: int) -> tuple[int, int]:
    """(row, col) of a row-major cell index in an S x S grid."""
    if not 0 <= cell < grid * grid:
        raise GeometryError(f"cell {cell} is outside a {grid}x{grid} grid (0..{grid * grid - 1})")
    return divmod(cell, grid)


def pack(tiles: np.ndarray, grid: int) -> np.ndarray:
    """Pack tiles into collages.

    tiles: (..., k, t, t, C) with k = grid * grid; returns (..., grid * t, grid * t, C).
    """
    k = grid * grid
    if grid < 1:
        raise GeometryError(f"grid must be at least 1, got {grid}")
    if tiles.ndim < 4 or tiles.shape[-4] != k:
        raise GeometryError(
            f"pack needs tiles shaped (..., {k}, t, t, C) for a {grid}x{grid} grid, got {tiles.shape}"
        )
    *lead, _, th, tw, c = tiles.shape
    x = tiles.reshape(*lead, grid, grid, th, tw, c)  # (..., row, col, y, x, C)
    n = len(lead)
    order = [*range(n), n, n + 2, n + 1, n + 3, n + 4]  # (..., row, y, col, x, C)
    return np.ascontiguousarray(x.transpose(order)).reshape(*lead, grid * th, grid * tw, c)


def split(collages: np.ndarray, grid: int) -> np.ndarray:
    """Split collages into their cells: the inverse of :func:`pack`.

    collages: (..., grid * t, grid * t, C); returns (..., k, t, t, C).
    """
    if collages.ndim < 3:
        raise GeometryError(f"split needs (..., H, W, C), got {collages.shape}")
    *lead, h, w, c = collages.shape
    if grid < 1 or h % grid or w % grid:
        raise GeometryError(f"a {h}x{w} collage does not split into a {grid}x{grid} grid")
    th, tw = h // grid, w // grid
    x = collages.reshape(*lead, grid, th, grid, tw, c)  # (..., row, y, col, x, C)
    n = len(lead)
    order = [*range(n), n, n + 2, n + 1, n + 3, n + 4]  # (..., row, col, y, x, C)
    return np.ascontiguousarray(x.transpose(order)).reshape(*lead, grid * grid, th, tw, c)


def fit_image(image: np.ndarray, size: int, channels: int) -> np.ndarray:
    """Resize one uint8 image (H, W) or (H, W, C) to (size, size, channels).

    Uses PIL's antialiased bilinear filter; the one resize used by training and serving.
    """
    if image.dtype != np.uint8:
        raise GeometryError(f"images must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise GeometryError(f"an image must be (H, W) or (H, W, C) with C in 1, 3, 4; got {image.shape}")
    if image.shape[2] == 4:
        image = image[:, :, :3]
    if image.shape[2] != channels:
        if channels == 1:  # ITU-R 601 luma, as PIL's convert("L")
            luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
            image = np.clip(np.rint(luma), 0, 255).astype(np.uint8)[:, :, None]
        elif channels == 3:
            image = np.repeat(image, 3, axis=2)
        else:
            raise GeometryError(f"cannot convert {image.shape[2]} channels to {channels}")
    if image.shape[0] == size and image.shape[1] == size:
        return np.ascontiguousarray(image)
    planes = [
        np.asarray(Image.fromarray(image[:, :, i]).resize((size, size), Image.BILINEAR))
        for i in range(channels)
    ]
    return np.stack(planes, axis=2)


def fit_images(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    """:func:`fit_image` over a stack (N, H, W[, C]); returns (N, size, size, channels)."""
    if images.ndim >= 3 and images.shape[1] == size and images.shape[2] == size:
        if images.ndim == 3 and channels == 1:
            return images[:, :, :, None]
        if images.ndim == 4 and images.shape[3] == channels:
            return images
    out = np.empty((len(images), size, size, channels), np.uint8)
    for i, image in enumerate(images):
        out[i] = fit_image(image, size, channels)
    return out
