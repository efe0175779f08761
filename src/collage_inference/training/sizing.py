"""The collage-CNN's size follows from its budget: one pass over a whole collage may cost what
one s-CNN pass costs, since the collage backs up k s-CNN passes with one.

The stem and stage widths of a collage config are scaled by one factor, each rounded to a
multiple of 4, and the largest factor whose FLOPs stay within the budget is kept; it must land
between ``LOW`` and ``HIGH`` times the s-CNN's FLOPs. FLOPs are counted by tracing the model
(:func:`~collage_inference.training.models.model_cost`), so the rule holds for any grid, tile
size and channel count.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from collage_inference.errors import ConfigError
from collage_inference.modelspec import ModelConfig
from collage_inference.training.models import build_model, model_cost

LOW, HIGH = 0.85, 1.0  # the band of the collage model's FLOPs, as multiples of the s-CNN's


@dataclass(frozen=True)
class Sizing:
    """A collage config fitted to a budget, and how."""

    config: ModelConfig
    flops: int
    budget: int  # the s-CNN's FLOPs for one image
    origin: str = "scaled to the budget"

    @property
    def ratio(self) -> float:
        return self.flops / self.budget

    def describe(self) -> str:
        """One line for `collage info` and the training log."""
        c = self.config
        return (
            f"widths {c.stem_width}/{'/'.join(map(str, c.widths))} {self.origin}: one collage costs "
            f"{self.ratio:.2f}x the s-CNN's FLOPs ({self.flops / 1e6:.1f} of {self.budget / 1e6:.1f} MFLOPs; "
            f"budget {LOW:g}-{HIGH:g}x)"
        )


def flops(config: ModelConfig) -> int:
    """FLOPs of one forward pass over one input of ``config``."""
    return model_cost(build_model(config), config).flops


def _scaled(config: ModelConfig, factor: float) -> ModelConfig:
    def width(w: int) -> int:
        return max(4, 4 * round(w * factor / 4))

    return dataclasses.replace(
        config, stem_width=width(config.stem_width), widths=tuple(map(width, config.widths))
    )


def fit_to_budget(config: ModelConfig, budget: int) -> Sizing:
    """``config`` (a collage model) with its widths scaled so that its FLOPs lie within
    ``LOW``..``HIGH`` times ``budget``; a ConfigError when no width does."""
    if config.kind != "collage":
        raise ConfigError("only collage models are sized to a FLOPs budget")
    lo, hi = 1 / 16, 16.0
    for _ in range(24):  # the largest factor that stays within the budget (FLOPs grow with it)
        mid = (lo * hi) ** 0.5
        if flops(_scaled(config, mid)) <= HIGH * budget:
            lo = mid
        else:
            hi = mid
    fitted = _scaled(config, lo)
    cost = flops(fitted)
    if not LOW * budget <= cost <= HIGH * budget:
        raise ConfigError(
            f"no width puts this collage model within {LOW:g}-{HIGH:g}x the s-CNN's "
            f"{budget / 1e6:.2f} MFLOPs (closest: {cost / budget:.2f}x); change --depth or "
            "--tile-size, or give --width to size it by hand"
        )
    return Sizing(fitted, cost, budget)
