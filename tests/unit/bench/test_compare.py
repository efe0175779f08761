"""The pure parts of `collage bench`: flags, run plans, CDF points, repeats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from collage_inference.bench.compare import (
    BenchConfig,
    RunSpec,
    build_parser,
    builtin_scenarios,
    cdf_points,
    config_from_args,
    median_run,
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
    assert cfg.runs() == 3 * (1 + 5 + 4) + 2


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
