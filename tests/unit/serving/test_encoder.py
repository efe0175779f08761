import numpy as np
import pytest

from collage_inference.errors import ConfigError
from collage_inference.grid import fit_image, split
from collage_inference.serving.encoder import CollageEncoder, encode
from collage_inference.serving.types import CloseReason, Group, Request


def group_of(requests: list[Request], grid: int) -> Group:
    return Group(7, grid, tuple(requests), 0.0, 0.01, CloseReason.DEADLINE)


def random_request(rng: np.random.Generator, i: int, shape: tuple[int, int, int]) -> Request:
    # never all-zero, so a real cell can be told from an empty one
    image = rng.integers(1, 256, size=shape, dtype=np.uint8)
    return Request(f"r{i}", image, 0.0, 1.0)


@pytest.mark.parametrize("grid", [1, 2, 3, 4])
def test_each_cell_holds_its_request_pixel_for_pixel(grid):
    rng = np.random.default_rng(grid)
    tile = 8
    requests = [random_request(rng, i, (tile, tile, 1)) for i in range(grid * grid)]
    collage = encode(group_of(requests, grid), tile, 1)
    assert collage.pixels.shape == (grid * tile, grid * tile, 1) and collage.pixels.dtype == np.uint8
    assert collage.tile == tile and collage.grid == grid and collage.group_id == 7
    cells = split(collage.pixels, grid)
    for cell, request in enumerate(requests):
        np.testing.assert_array_equal(cells[cell], request.image)
        assert collage.cells[cell] == request.id


def test_cells_are_row_major():
    tile, grid = 4, 3
    requests = [Request(f"r{i}", np.full((tile, tile, 1), 10 + i, np.uint8), 0.0, 1.0) for i in range(9)]
    pixels = encode(group_of(requests, grid), tile, 1).pixels
    for cell in range(9):
        row, col = divmod(cell, grid)
        block = pixels[row * tile : (row + 1) * tile, col * tile : (col + 1) * tile]
        assert (block == 10 + cell).all()


def test_images_are_resized_with_the_shared_fit_image():
    rng = np.random.default_rng(0)
    tile = 12
    requests = [
        random_request(rng, 0, (28, 28, 1)),
        random_request(rng, 1, (40, 30, 3)),  # rgb to gray, non-square
        random_request(rng, 2, (12, 12, 1)),
    ]
    collage = encode(group_of(requests, 2), tile, 1)
    cells = split(collage.pixels, 2)
    for cell, request in enumerate(requests):
        np.testing.assert_array_equal(cells[cell], fit_image(request.image, tile, 1))


def test_missing_cells_are_black_and_unmapped():
    rng = np.random.default_rng(1)
    requests = [random_request(rng, i, (6, 6, 3)) for i in range(3)]
    collage = encode(group_of(requests, 3), 6, 3)
    cells = split(collage.pixels, 3)
    assert all(cells[c].any() for c in range(3))
    assert not cells[3:].any()  # six all-zero tiles
    assert collage.cells == ("r0", "r1", "r2", None, None, None, None, None, None)


def test_encoder_holds_a_tile_size_per_grid():
    rng = np.random.default_rng(2)
    encoder = CollageEncoder({2: 16, 3: 10}, channels=1)
    assert encoder.grids == (2, 3)
    requests = [random_request(rng, i, (28, 28, 1)) for i in range(2)]
    assert encoder.encode(group_of(requests, 2)).pixels.shape == (32, 32, 1)
    assert encoder.encode(group_of(requests, 3)).pixels.shape == (30, 30, 1)
    with pytest.raises(ConfigError, match="4x4"):
        encoder.encode(group_of(requests, 4))


def test_too_many_requests_or_bad_tiles_are_errors():
    rng = np.random.default_rng(3)
    requests = [random_request(rng, i, (4, 4, 1)) for i in range(5)]
    with pytest.raises(ConfigError):
        encode(group_of(requests, 2), 4, 1)
    with pytest.raises(ConfigError):
        encode(group_of(requests[:1], 2), 0, 1)
