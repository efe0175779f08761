"""What a `collage bench` run measures: a straggler scenario and the load points of the sweep.

A scenario is one straggler model (a slowdown spec and kind, see collage_inference/slowdown.py). A load
point is an arrival pattern and a utilisation of the k s-CNN workers; the offered rate it means
is ``load * k / E[service]``, with E[service] the mean of the scenario's own delay samples
(a worker is busy for its whole sampled latency, so that is its service time).

The trace runs at its own time scale (1x) by default. Scaling delays by c without scaling the
arrival rate by 1/c changes the regime, and the serving path's own few milliseconds do not
scale at all; expressing load as utilisation keeps the rate in step with the scale, and the
report states the serving overhead's share of the median primary latency, so a run at a
shorter scale shows whether its fixed costs still stay small (under 5%).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from collage_inference.config import REPO_ROOT
from collage_inference.errors import ConfigError
from collage_inference.slowdown import parse_sampler

TRACE_PATH = REPO_ROOT.parent / "shared" / "traces" / "cloud-latency-trace.npy"
PATTERNS = ("burst", "poisson", "constant")  # the loadgen's arrival processes
DEFAULT_PATTERNS = ("burst", "poisson")
OVERHEAD_SHARE_LIMIT = 0.05  # the serving path's share of the median primary latency a run may have


@dataclass(frozen=True)
class Scenario:
    """One straggler model: a slowdown spec and kind (see collage_inference/slowdown.py)."""

    name: str
    spec: str
    kind: str = "per-request"
    description: str = ""
    onset_rate: float = 0.05  # per-instance only: slow periods per second per worker
    period: float = 2.0  # per-instance only: mean slow period, seconds
    scale: float = 1.0  # the time scale of the delays (the spec carries it too)

    def service_s(self, seed: int = 0, draws: int = 200_000) -> float:
        """Mean service time of one call under this scenario, seconds (sets the offered rate)."""
        sampler = parse_sampler(self.spec)
        if sampler is None or self.kind != "per-request":
            raise ConfigError(f"scenario {self.name}: load points need per-request delay samples")
        return float(sampler.sample(np.random.default_rng(seed), draws).mean())

    def ideal(self, seed: int = 0, draws: int = 400_000) -> dict[str, float]:
        """The sampler's own tail, in ms: one draw (no redundancy, no queue, no overhead) against
        the faster of two independent draws (a free, instant second copy of every request)."""
        sampler = parse_sampler(self.spec)
        assert sampler is not None
        rng = np.random.default_rng(seed)
        one, two = sampler.sample(rng, draws) * 1e3, sampler.sample(rng, draws) * 1e3
        best = np.minimum(one, two)
        figures = {
            "p50_one_ms": np.percentile(one, 50),
            "p90_one_ms": np.percentile(one, 90),
            "p99_one_ms": np.percentile(one, 99),
            "p99_min2_ms": np.percentile(best, 99),
            "std_one_ms": one.std(),
            "std_min2_ms": best.std(),
        }
        return {k: round(float(v), 3) for k, v in figures.items()}


def at_scale(scenario: Scenario, trace_path: Path, scale: float) -> Scenario:
    """The same named scenario at another time scale."""
    return builtin_scenarios(trace_path, scale)[scenario.name]


def builtin_scenarios(trace_path: Path = TRACE_PATH, scale: float = 1.0) -> dict[str, Scenario]:
    """The named per-request scenarios. ``trace`` exists only when the trace file does."""
    found = {
        "bimodal": Scenario(
            "bimodal",
            f"bimodal:{scale:g}",
            scale=scale,
            description=f"The bimodal model fitted to the cloud trace, scaled {scale:g}x: 2% of calls "
            "take ~5x the median.",
        ),
        "pareto": Scenario(
            "pareto",
            f"pareto:alpha=2,scale={0.1 * scale:g},cap={5 * scale:g}",
            scale=scale,
            description=f"A Pareto tail (alpha 2, from {100 * scale:g} ms, capped at {5 * scale:g} s).",
        ),
    }
    if trace_path.is_file():
        found = {
            "trace": Scenario(
                "trace",
                f"trace:{trace_path}:{scale:g}",
                scale=scale,
                description=f"The cloud latency trace ({trace_path.name}) at {scale:g}x, drawn per "
                "request: total latency = max(compute, sample).",
            ),
            **found,
        }
    return found


@dataclass(frozen=True)
class LoadPoint:
    """One arrival pattern at one utilisation of the k s-CNN workers."""

    pattern: str  # "burst" (burst_size requests at once, Poisson bursts), "poisson" or "constant"
    load: float
    rate: float  # offered requests per second

    @property
    def label(self) -> str:
        return f"{self.pattern} {self.load:g}"


def load_points(
    patterns: tuple[str, ...], loads: tuple[float, ...], k: int, service_s: float
) -> list[LoadPoint]:
    """Every pattern at every load, rates from ``load * k / service_s``."""
    unknown = [p for p in patterns if p not in PATTERNS]
    if unknown:
        raise ConfigError(f"unknown arrival pattern(s) {unknown}; choose from {', '.join(PATTERNS)}")
    if not loads or any(not 0 < u < 1 for u in loads):
        raise ConfigError(f"--loads are utilisations of the s-CNN workers in (0, 1), got {loads}")
    return [LoadPoint(p, u, round(u * k / service_s, 3)) for p in patterns for u in loads]
