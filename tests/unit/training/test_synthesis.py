import numpy as np
import pytest

from collage_inference.errors import ConfigError
from collage_inference.grid import split
from collage_inference.training.synthesis import EMPTY_SOURCE, CollageSynthesizer, augment


def _distinct_tiles(n: int, t: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Tiles whose pixels encode their own index, so a cell can be traced back to its source."""
    tiles = np.stack([np.full((t, t, 1), i + 1, np.uint8) for i in range(n)])
    return tiles, np.arange(n) % 10


@pytest.mark.parametrize("grid", [2, 3, 4])
def test_labels_match_tiles(grid):
    tiles, labels = _distinct_tiles(50)
    synth = CollageSynthesizer(tiles, labels, grid, num_classes=10, empty_prob=0.5)
    batch = synth.sample(64, np.random.default_rng(1))
    cells = split(batch.collages, grid)  # (B, k, t, t, 1)
    for b in range(64):
        for c in range(grid * grid):
            src = batch.sources[b, c]
            if src == EMPTY_SOURCE:
                assert batch.labels[b, c] == 10 and (cells[b, c] == 0).all()
            else:
                assert (cells[b, c] == src + 1).all()
                assert batch.labels[b, c] == labels[src]


def test_partial_collages_have_between_one_and_k_minus_one_empty_cells():
    tiles, labels = _distinct_tiles(20)
    batch = CollageSynthesizer(tiles, labels, 3, 10, empty_prob=1.0).sample(200, np.random.default_rng(0))
    empty = (batch.sources == EMPTY_SOURCE).sum(1)
    assert empty.min() >= 1 and empty.max() <= 8
    full = CollageSynthesizer(tiles, labels, 3, 10, empty_prob=0.0).sample(50, np.random.default_rng(0))
    assert (full.sources != EMPTY_SOURCE).all()


def test_sampling_is_deterministic_for_a_seed():
    tiles, labels = _distinct_tiles(30)
    synth = CollageSynthesizer(tiles, labels, 2, 10, empty_prob=0.3, max_shift=1, flip=True)
    a = synth.sample(16, np.random.default_rng(7))
    b = synth.sample(16, np.random.default_rng(7))
    np.testing.assert_array_equal(a.collages, b.collages)
    np.testing.assert_array_equal(a.labels, b.labels)


@pytest.mark.parametrize("partial", [False, True])
def test_evaluation_uses_every_image_once(partial):
    tiles, labels = _distinct_tiles(23)
    sources = CollageSynthesizer(tiles, labels, 3, 10).evaluation_sources(seed=5, partial=partial)
    used = sources[sources != EMPTY_SOURCE]
    assert sorted(used.tolist()) == list(range(23))
    if partial:
        per_collage = (sources != EMPTY_SOURCE).sum(1)
        assert per_collage.min() >= 1 and per_collage.max() <= 8


def test_augment_flips_and_shifts_within_bounds():
    images = np.zeros((200, 8, 8, 1), np.uint8)
    images[:, 3:5, 0] = 255  # a bar on the left edge
    out = augment(images, np.random.default_rng(0), max_shift=2, flip=True)
    assert out.shape == images.shape and out.dtype == np.uint8
    assert (out[:, :, 6:] > 0).any(), "some images must be flipped to the right edge"
    assert ((out > 0).sum(axis=(1, 2, 3)) <= 2).all()


def test_bad_empty_prob_is_rejected():
    tiles, labels = _distinct_tiles(3)
    with pytest.raises(ConfigError, match="empty_prob"):
        CollageSynthesizer(tiles, labels, 2, 10, empty_prob=1.5)
