"""A tiny `collage bench` end to end: real clusters, real load, the whole report folder.

Four short runs at S = 2 (reference, none, replicate at one timeout, collage) under a strong
per-request Pareto tail, so that even ~200 requests show the signal: the collage mode must
beat ``none`` at p99. Every output file is checked for existence and sane values.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from collage_inference.bench.compare import BenchConfig, Scenario, execute

pytestmark = pytest.mark.slow

STRONG = Scenario(
    "strong",
    "pareto:alpha=1.3,scale=0.008,cap=0.4",
    description="a heavy tail: ~8% of calls take over 5x the minimum",
)


def test_tiny_bench_writes_the_report_and_collage_beats_none(models_dir: Path, tmp_path: Path) -> None:
    if not (models_dir / "collage-2x2.onnx").is_file() or not (models_dir / "scnn.onnx").is_file():
        pytest.skip("the shipped scnn and collage-2x2 models are missing")
    config = BenchConfig(
        scenarios=(STRONG,),
        modes=("none", "replicate", "collage"),
        grid=2,
        grids=(2,),
        rate=50.0,
        requests=200,
        warmup=30,
        sweep=(2.0,),
        quiet_wait=0.0,  # a test must not wait for a quiet machine, only record how busy it was
        retry_busy=0,
        models_dir=models_dir,
    )
    results, files = execute(config, tmp_path)

    assert {p.name for p in files} == {"results.json", "summary.md", "cdf-strong.png", "tail-strong.png"}
    assert all(p.stat().st_size > 0 for p in files)
    stored = json.loads((tmp_path / "results.json").read_text())
    sc = stored["scenarios"][0]
    assert set(sc["modes"]) == {"none", "replicate", "collage"}
    for run in [sc["reference"], *sc["modes"].values()]:
        assert run["requests"] == 200 and run["answered"] == 200 and not run["errors"]
        assert 0 < run["p50_ms"] <= run["p90_ms"] <= run["p99_ms"] <= run["p999_ms"] <= run["max_ms"]
        assert 0.6 < run["accuracy"] <= 1.0
        assert abs(sum(run["sources"].values()) - 1.0) < 1e-9
        assert run["others_cpu_share"] is None or 0.0 <= run["others_cpu_share"] <= 1.0
    modes = sc["modes"]
    assert modes["none"]["extra_cost"] == 0 and modes["collage"]["extra_cost"] == pytest.approx(0.25)
    assert modes["collage"]["sources"].get("collage", 0) > 0  # the collage did rescue stragglers
    assert modes["collage"]["mean_group_size"] >= 1.0  # read from the front end's /metrics
    assert modes["replicate"]["replicate_timeout_ms"] == pytest.approx(2 * modes["none"]["p50_ms"], abs=1)
    assert modes["collage"]["p99_ms"] < modes["none"]["p99_ms"]
    names = {t["name"] for t in sc["targets"]}
    assert "p99 none / p99 collage" in names
    assert "p99 none / p99 collage" in (tmp_path / "summary.md").read_text()
    assert stored["load"]["rate_rps"] == 50.0 and stored["machine"]["cpus"] >= 1
    assert results["duration_s"] > 0
