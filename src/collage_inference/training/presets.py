"""The recipes of the shipped models: `collage train --preset NAME` and `make models` use them.

Sized for a 2-core CPU (the s-CNN and the three collage models retrain in about 27 minutes
there). Each collage model spends 0.85 to 1.0 s-CNN passes of FLOPs on a whole collage (checked
in the tests).
"""

from __future__ import annotations

from pathlib import Path

from collage_inference.errors import ConfigError
from collage_inference.modelspec import ModelConfig
from collage_inference.parm import CONCAT_KS, ENCODERS
from collage_inference.training.parity import ParityConfig
from collage_inference.training.sizing import Sizing, flops
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


# The collage models learn the s-CNN's soft labels beside the true ones (weight ``distill``):
# at the same epochs that added 0.8 points of per-cell accuracy to the 4x4 model and brought its
# answers closer to the s-CNN's, so they need fewer epochs. Batches of 64 train them 10% faster.
_DISTILLED = {"distill": 0.7, "batch_size": 64}

PRESETS: dict[str, tuple[ModelConfig, dict]] = {
    "scnn": (ModelConfig("scnn", FASHION_CLASSES), {"epochs": 18}),
    "collage-2x2": (_collage(2, 28, (2, 2, 1), stem=24, widths=(40, 80, 128)), {"epochs": 14, **_DISTILLED}),
    "collage-3x3": (_collage(3, 24, (2, 2, 2), stem=24, widths=(40, 80, 160)), {"epochs": 18, **_DISTILLED}),
    # Widths spend most of the FLOP budget of one s-CNN pass on each collage.
    "collage-4x4": (_collage(4, 16, (2, 2, 2), stem=24, widths=(48, 96, 192)), {"epochs": 20, **_DISTILLED}),
}


# ParM's parity models for the shipped s-CNN (collage_inference.training.parity): k = 2 and 4,
# both of ParM's image encoders.
PARITY_PRESETS: dict[str, dict] = {
    f"parm-k{k}-{encoder}": {"k": k, "encoder": encoder, "epochs": 20}
    for encoder in ENCODERS
    for k in CONCAT_KS
}


def preset_names(which: str) -> list[str]:
    """The presets ``--preset`` names: one, ``all`` (the s-CNN first, then the collage models
    that learn from it) or ``parm`` (the parity models)."""
    groups = {"all": list(PRESETS), "parm": list(PARITY_PRESETS)}
    if which in groups:
        return groups[which]
    if which not in PRESETS and which not in PARITY_PRESETS:
        known = ", ".join([*PRESETS, *PARITY_PRESETS, "all", "parm"])
        raise ConfigError(f"unknown preset {which!r}; choose one of {known}")
    return [which]


def preset(name: str, models_dir: Path, **overrides) -> TrainConfig | ParityConfig:
    """The training config of a shipped model, writing ``models_dir/NAME.pt``. Collage presets
    that distill, and the parity models, learn from ``models_dir/scnn.pt`` (``--preset all``
    trains it first)."""
    if name in PARITY_PRESETS:
        overrides.pop("resume", None)
        recipe = {**PARITY_PRESETS[name], **overrides}
        return ParityConfig(models_dir / "scnn.pt", out=models_dir / f"{name}.pt", name=name, **recipe)
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join([*PRESETS, *PARITY_PRESETS])}")
    model, recipe = PRESETS[name]
    recipe = {**recipe, **overrides}
    sizing = ""
    if model.kind == "collage":
        recipe.setdefault("teacher", models_dir / "scnn.pt")
        scnn = PRESETS["scnn"][0]
        sizing = Sizing(model, flops(model), flops(scnn), "set by the preset").describe()
    return TrainConfig(model=model, out=models_dir / f"{name}.pt", name=name, sizing=sizing, **recipe)
