import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from collage_inference.errors import GeometryError
from collage_inference.grid import cell_index, cell_position, fit_image, fit_images, pack, split


def test_pack_places_tiles_row_major():
    grid, t = 3, 4
    tiles = np.stack([np.full((t, t, 1), i, np.uint8) for i in range(9)])
    collage = pack(tiles, grid)
    assert collage.shape == (12, 12, 1)
    for cell in range(9):
        row, col = cell_position(cell, grid)
        assert cell == row * grid + col == cell_index(row, col, grid)
        block = collage[row * t : (row + 1) * t, col * t : (col + 1) * t]
        assert (block == cell).all()


def test_pack_keeps_pixel_layout_inside_tiles():
    tiles = np.arange(4 * 2 * 2 * 3, dtype=np.uint8).reshape(4, 2, 2, 3)
    collage = pack(tiles, 2)
    np.testing.assert_array_equal(collage[0:2, 2:4], tiles[1])
    np.testing.assert_array_equal(collage[2:4, 0:2], tiles[2])


@given(
    grid=st.integers(1, 5),
    tile=st.integers(1, 9),
    channels=st.sampled_from([1, 3]),
    lead=st.integers(0, 2),
    seed=st.integers(0, 2**32 - 1),
)
def test_split_inverts_pack(grid, tile, channels, lead, seed):
    rng = np.random.default_rng(seed)
    shape = (2,) * lead + (grid * grid, tile, tile, channels)
    tiles = rng.integers(0, 256, shape, dtype=np.uint8)
    collages = pack(tiles, grid)
    assert collages.shape == (2,) * lead + (grid * tile, grid * tile, channels)
    np.testing.assert_array_equal(split(collages, grid), tiles)
    np.testing.assert_array_equal(pack(split(collages, grid), grid), collages)


def test_geometry_errors_are_clear():
    with pytest.raises(GeometryError, match="3x3 grid"):
        pack(np.zeros((4, 2, 2, 1), np.uint8), 3)
    with pytest.raises(GeometryError, match="does not split"):
        split(np.zeros((10, 10, 1), np.uint8), 3)
    with pytest.raises(GeometryError, match="outside"):
        cell_position(9, 3)


def test_fit_image_resizes_and_converts_channels():
    rgb = np.zeros((40, 30, 3), np.uint8)
    rgb[..., 0] = 255
    gray = fit_image(rgb, 16, 1)
    assert gray.shape == (16, 16, 1) and gray.dtype == np.uint8
    assert abs(int(gray[8, 8, 0]) - 76) <= 1  # 0.299 * 255, ITU-R 601 luma
    assert fit_image(np.zeros((28, 28), np.uint8), 28, 3).shape == (28, 28, 3)
    assert fit_images(np.zeros((5, 28, 28), np.uint8), 14, 1).shape == (5, 14, 14, 1)
    with pytest.raises(GeometryError, match="uint8"):
        fit_image(np.zeros((4, 4), np.float32), 4, 1)
