"""The recipes of the shipped models: `collage train --preset NAME` and `make models` use them.

Sized for a 2-core CPU (all four retrain in about 80 minutes there). The collage
models spend at most one s-CNN pass of FLOPs on a whole collage (checked in the tests).
"""

from __future__ import annotations

from pathlib import Path

from collage_inference.errors import ConfigError
from collage_inference.modelspec import ModelConfig
from collage_inference.training.train import TrainConfig

FASHION_CLASSES = 10


def _collage(
    grid: int, tile: int, strides: tuple[int, ...], stem: int = 16, widths: tuple[int, ...] = (32, 64, 128)
) -> ModelConfig:
    return ModelConfig(
        "collage",
        FASHION_CLASSES,
        image_size=tile,
        grid=grid,
        stem_width=stem,
        widths=widths,
        blocks=(1, 2, 2),
        strides=strides,
    )


PRESETS: dict[str, tuple[ModelConfig, dict]] = {
    "scnn": (ModelConfig("scnn", FASHION_CLASSES), {"epochs": 16}),
    "collage-2x2": (_collage(2, 28, (2, 2, 1), stem=24, widths=(40, 80, 128)), {"epochs": 24}),
    "collage-3x3": (_collage(3, 24, (2, 2, 2), stem=24, widths=(40, 80, 160)), {"epochs": 30}),
    # Widths spend most of the FLOP budget of one s-CNN pass on each collage.
    "collage-4x4": (_collage(4, 16, (2, 2, 2), stem=24, widths=(48, 96, 192)), {"epochs": 30}),
}


def preset(name: str, models_dir: Path, **overrides) -> TrainConfig:
    """The training config of a shipped model, writing ``models_dir/NAME.pt``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    model, recipe = PRESETS[name]
    return TrainConfig(model=model, out=models_dir / f"{name}.pt", name=name, **{**recipe, **overrides})
