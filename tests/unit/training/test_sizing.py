"""A collage model's size follows from its budget, one s-CNN pass of FLOPs per collage, for any
grid, tile size and channel count."""

from __future__ import annotations

import pytest

from collage_inference.errors import ConfigError
from collage_inference.modelspec import ModelConfig
from collage_inference.training.sizing import HIGH, LOW, fit_to_budget, flops


def _collage(grid: int, tile: int, channels: int, strides=(2, 2, 2)) -> ModelConfig:
    norm = {"mean": (0.5,) * channels, "std": (0.25,) * channels}
    return ModelConfig("collage", 10, channels, tile, grid, stem_width=16, widths=(32, 64, 128),
                       strides=strides, **norm)  # fmt: skip


def _scnn(size: int, channels: int) -> ModelConfig:
    return ModelConfig("scnn", 10, channels, size, mean=(0.5,) * channels, std=(0.25,) * channels)


@pytest.mark.parametrize(
    ("grid", "tile", "channels", "strides"),
    [(2, 28, 1, (2, 2, 1)), (3, 24, 1, (2, 2, 2)), (4, 16, 1, (2, 2, 2)), (2, 32, 3, (2, 2, 2)),
     (4, 32, 3, (2, 2, 2))],
)  # fmt: skip
def test_every_grid_lands_in_the_budget(grid: int, tile: int, channels: int, strides) -> None:
    budget = flops(_scnn(28 if channels == 1 else 32, channels))
    sizing = fit_to_budget(_collage(grid, tile, channels, strides), budget)
    assert LOW <= sizing.ratio <= HIGH and sizing.flops == flops(sizing.config)
    assert sizing.budget == budget and f"{sizing.ratio:.2f}x" in sizing.describe()
    c = sizing.config
    assert all(w % 4 == 0 for w in (c.stem_width, *c.widths))
    assert (c.grid, c.image_size, c.in_channels, c.blocks) == (grid, tile, channels, (1, 1, 1))


def test_the_width_follows_the_budget() -> None:
    config = _collage(2, 32, 3)
    small = fit_to_budget(config, flops(_scnn(32, 3)) // 4).config
    large = fit_to_budget(config, flops(_scnn(32, 3))).config
    assert small.widths[-1] < large.widths[-1]


def test_what_cannot_be_sized_says_why() -> None:
    with pytest.raises(ConfigError, match="collage"):
        fit_to_budget(_scnn(28, 1), 10**7)
    with pytest.raises(ConfigError, match="--width"):
        fit_to_budget(_collage(4, 16, 1), 1000)  # less than the smallest model costs
