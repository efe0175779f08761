"""The pure parts of `collage bench`: flags, run plans, CDF points, repeats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from collage_inference.bench.compare import (
    BenchConfig,
    Harness,
    Images,
    RunSpec,
    Scenario,
    build_parser,
    builtin_scenarios,
    cdf_points,
    config_from_args,
    cpu_account,
    median_run,
    others_share,
    serve_overrides,
)
from collage_inference.config import load_config
from collage_inference.errors import ConfigError


def config(argv: list[str]) -> BenchConfig:
    return config_from_args(build_parser().parse_args(argv), argv)


def test_quick_is_one_scenario_at_s3_with_a_short_sweep(tmp_path: Path) -> None:
    trace = tmp_path / "t.npy"
    np.save(trace, np.full(10, 0.1))
    cfg = config(["--quick", "--trace", str(trace)])
    assert [s.name for s in cfg.scenarios] == ["trace"]
    assert cfg.grids == (3,) and cfg.grid == 3 and len(cfg.sweep) == 2
    assert cfg.runs() == 1 + 1 + 1 + 2 + 1 + 1 + 1  # reference, none, equal, 2 replicate, hedge, all, collage
    without = config(["--quick", "--trace", str(tmp_path / "missing.npy")])
    assert [s.name for s in without.scenarios] == ["bimodal"]


def test_full_plan_counts_the_grid_sweep(tmp_path: Path) -> None:
    cfg = config(["--trace", str(tmp_path / "missing.npy")])
    assert [s.name for s in cfg.scenarios] == ["bimodal", "pareto", "per-instance"]
    assert cfg.runs() == 3 * (1 + 5 + 5) + 2


@pytest.mark.parametrize(
    "argv",
    [
        ["--scenarios", "nope"],
        ["--scenarios", "trace", "--trace", "/nonexistent.npy"],
        ["--modes", "none,turbo"],
        ["--sweep", "1,x"],
        ["--rate", "0"],
        ["--trace-scale", "-1"],
    ],
)
def test_bad_flags_are_config_errors(argv: list[str]) -> None:
    with pytest.raises(ConfigError):
        config(argv)


def test_overrides_build_a_valid_serve_config() -> None:
    sc = builtin_scenarios(Path("/nonexistent"))["per-instance"]
    cfg = BenchConfig(scenarios=(sc,))
    serve = load_config(overrides=serve_overrides(RunSpec(sc, "replicate", 3, replicate_timeout=0.03), cfg))
    assert serve.mode == "replicate" and serve.replicate_timeout == 0.03 and serve.port == 0
    assert serve.slowdown.kind == "per-instance" and serve.slowdown.collage and not serve.restart
    clean = load_config(overrides=serve_overrides(RunSpec(sc, "none", 3, stragglers=False), cfg))
    assert not clean.slowdown.active


def test_cdf_points_are_monotone_and_reach_the_max() -> None:
    lat = np.random.default_rng(0).exponential(10.0, 1000)
    cdf = cdf_points(lat)
    assert cdf["p"][0] == 0.0 and cdf["p"][-1] == 1.0
    assert np.all(np.diff(cdf["ms"]) >= 0) and cdf["ms"][-1] == pytest.approx(lat.max(), abs=1e-3)
    assert sum(p >= 0.99 for p in cdf["p"]) > 20  # dense in the tail
    assert cdf_points(np.array([])) == {"p": [], "ms": []}


def test_median_run_reports_medians_and_spread() -> None:
    runs = [{"p99_ms": v, "std_ms": v / 10, "accuracy": 0.9, "errors": {}} for v in (30.0, 10.0, 20.0)]
    for r in runs:
        r.update({k: 1.0 for k in ("p50_ms", "p90_ms", "p999_ms", "mean_ms", "max_ms", "throughput_rps")})
    out = median_run(runs)
    assert out["p99_ms"] == 20.0 and out["spread"]["p99_ms"] == [10.0, 30.0] and out["repeats"] == 3


def _fake_harness(sweep: tuple[float, ...], bracket: int, best_ms: float) -> tuple[Harness, list[float]]:
    """A harness whose replicate runs report p99 = |timeout - best_ms| + 30 without a cluster."""
    cfg = BenchConfig(scenarios=(Scenario("s", "bimodal:0.1"),), sweep=sweep, bracket=bracket)
    images = Images(np.zeros((1, 28, 28), np.uint8), np.zeros(1, np.int64), "test")
    harness = Harness(cfg, images, log=lambda _: None)
    timeouts: list[float] = []

    def measure(spec: RunSpec) -> dict:
        assert spec.replicate_timeout is not None
        timeouts.append(spec.replicate_timeout * 1e3)
        p99 = abs(spec.replicate_timeout * 1e3 - best_ms) + 30.0
        return {"p50_ms": 20.0, "p99_ms": p99, "p999_ms": p99, "std_ms": 1.0, "reissued_per_request": 0.1}

    harness.measure = measure  # type: ignore[method-assign]
    return harness, timeouts


def test_replicate_sweep_extends_past_an_end_that_holds_the_best() -> None:
    harness, timeouts = _fake_harness((1.0, 2.0), bracket=2, best_ms=5.0)
    out = harness.replicate_sweep(harness.config.scenarios[0], 3, fast_ms=20.0)
    assert timeouts == [20.0, 40.0, 12.0, 7.0]  # 20 ms * 0.6, then * 0.6 again (rounded)
    assert out["replicate_timeout_ms"] == pytest.approx(7.0)
    assert [p["timeout_ms"] for p in out["sweep"]] == pytest.approx([7.0, 12.0, 20.0, 40.0])
    assert out["sweep"][0]["reissued_per_request"] == 0.1


def test_replicate_sweep_stops_once_the_best_is_inside() -> None:
    harness, timeouts = _fake_harness((1.0, 2.0), bracket=2, best_ms=70.0)
    out = harness.replicate_sweep(harness.config.scenarios[0], 3, fast_ms=20.0)
    assert timeouts == [20.0, 40.0, 64.0, 102.0]  # upward: 2 * 1.6, then 3.2 * 1.6
    assert out["replicate_timeout_ms"] == pytest.approx(64.0)
    harness, timeouts = _fake_harness((1.0, 2.0, 3.0), bracket=2, best_ms=40.0)
    harness.replicate_sweep(harness.config.scenarios[0], 3, fast_ms=20.0)
    assert timeouts == [20.0, 40.0, 60.0]  # interior best: nothing added
    harness, timeouts = _fake_harness((2.0,), bracket=2, best_ms=5.0)
    harness.replicate_sweep(harness.config.scenarios[0], 3, fast_ms=20.0)
    assert timeouts == [40.0]  # one point: nothing to bracket


def test_others_share_subtracts_our_own_cpu_time() -> None:
    # 10 CPU-seconds elapsed, 6 busy, 2 of them ours: others took 40%
    assert others_share((100.0, 1000.0, 5.0), (106.0, 1010.0, 7.0)) == pytest.approx(0.4)
    assert others_share((100.0, 1000.0, 5.0), (101.0, 1010.0, 9.0)) == 0.0  # clamped
    assert others_share(None, (1.0, 2.0, 3.0)) is None
    assert cpu_account() is None or len(cpu_account()) == 3
