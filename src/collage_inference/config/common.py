"""What every part of the config shares: where the repository and the shipped models are, the
limits on a grid, and the checks whose errors name both a key and its flag."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from collage_inference.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_MODELS_DIR = Path(os.environ.get("COLLAGE_MODELS_DIR", REPO_ROOT / "models" / "fashion-mnist"))
AUTO = "auto"
AUTO_GRIDS = (2, 3, 4)  # the collage grids ``grid = "auto"`` serves when their models exist
AUTO_SIZING_GRID = 3  # with ``grid = "auto"``, s-CNN workers are sized for k = 3 x 3 by default
MAX_GRID = 8
COLLAGE_SEED_OFFSET = 1000  # collage worker i draws its delays with seed + 1000 + i
# [slowdown] keys -> the flags of `collage serve` (and of `collage worker`, where they exist)
SLOWDOWN_FLAGS = {"spec": "slowdown", "kind": "slowdown_kind", "workers": "slow_workers",
                  "collage": "slow_collage", "onset_rate": "slow_onset_rate", "period": "slow_period",
                  "seed": "seed", "contention": "contention"}  # fmt: skip


def flag_of(key: str) -> str:
    """The command-line flag of a config key: ``slowdown.seed`` -> ``--seed``."""
    if key.startswith("ray."):
        return "--address" if key == "ray.address" else f"[ray] {key.removeprefix('ray.')}"
    flag = SLOWDOWN_FLAGS.get(key.removeprefix("slowdown."), key) if key.startswith("slowdown.") else key
    return "--" + flag.replace("_", "-")


def bad(key: str, problem: str, fix: str) -> ConfigError:
    """The error for a bad value of ``key``: what was wrong and the fix, naming the key and its flag."""
    return ConfigError(f"`{key}` ({flag_of(key)}) {problem}; {fix}")


def number(
    value: Any,
    key: str,
    *,
    integer: bool = False,
    low: float = 0.0,
    strict: bool = True,
    high: float = math.inf,
) -> Any:
    """Check a number (ints allowed where floats are); ``strict``: above ``low``, else at least;
    at most ``high``."""
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        raise bad(key, f"must be {kind}, got {value!r}", f"write e.g. {key.split('.')[-1]} = {low + 1:g}")
    if value < low or (strict and value == low):
        bound = f"above {low:g}" if strict else f"at least {low:g}"
        raise bad(key, f"must be {bound}, got {value!r}", "give a larger value")
    if value > high:
        raise bad(key, f"must be at most {high:g}, got {value!r}", "give a smaller value")
    return value


def choice(value: Any, key: str, choices: tuple[str, ...] | list[str]) -> str:
    """Check that ``value`` is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise bad(key, f"is {value!r}", f"choose one of {', '.join(choices)}")
    return value


def port_number(value: Any, key: str) -> None:
    """Check a TCP port (0 picks a free one)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise bad(key, f"is {value!r}", "give a port in 0..65535 (0 picks a free one)")
