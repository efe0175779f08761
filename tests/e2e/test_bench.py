"""A small `collage bench` end to end: real clusters, real load, the whole report folder.

One burst load point (bursts of k = 9 at once, as in the published experiments) under the
bimodal straggler model at a quarter of the trace's time scale, so ~300 requests per mode take
seconds: collage mode must beat ``none`` at p99, and every output file must hold sane values.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from collage_inference.bench.compare import BenchConfig, execute
from collage_inference.bench.scenarios import Scenario

pytestmark = pytest.mark.slow

QUARTER = Scenario("bimodal", "bimodal:0.25", description="the bimodal trace model at 0.25x")


def test_under_bursts_collage_beats_none_and_the_report_is_whole(models_dir: Path, tmp_path: Path) -> None:
    if not (models_dir / "collage-3x3.onnx").is_file() or not (models_dir / "scnn.onnx").is_file():
        pytest.skip("the shipped scnn and collage-3x3 models are missing")
    config = BenchConfig(
        scenario=QUARTER,
        modes=("none", "collage"),
        patterns=("burst",),
        loads=(0.3,),
        requests=297,
        warmup=81,
        quiet_wait=0.0,  # a test must not wait for a quiet machine, only record how busy it was
        retry_busy=0,
        models_dir=models_dir,
    )
    results = execute(config, tmp_path)

    files = {p.name for p in tmp_path.iterdir()}
    assert files == {"results.json", "summary.md", "summary.html", "p99-vs-load.png", "std-vs-load.png"}
    stored = json.loads((tmp_path / "results.json").read_text())
    [point] = stored["points"]
    assert point["pattern"] == "burst" and point["rate_rps"] == pytest.approx(0.3 * 9 / 0.0385, rel=0.05)
    modes = point["modes"]
    for run in [stored["reference"], *modes.values()]:
        assert run["requests"] == 297 and run["answered"] == 297 and not run["errors"]
        assert 0 < run["p50_ms"] <= run["p90_ms"] <= run["p99_ms"] <= run["max_ms"]
        assert 0.6 < run["accuracy"] <= 1.0
    assert modes["none"]["burst"]["count"] == 297 // 9  # per-burst latency, as the authors measured
    collage = modes["collage"]
    assert collage["extra_cost"] == pytest.approx(1 / 9) and collage["mean_group_size"] == pytest.approx(
        9, abs=0.5
    )
    assert collage["sources"].get("collage", 0) > 0  # the collage did rescue stragglers
    assert collage["p99_ms"] < modes["none"]["p99_ms"]
    assert point["ratios"]["collage"]["none_over_collage_p99"] > 1.0
    assert any(t["name"].startswith("none / collage") for t in stored["targets"])
    assert "## Targets" in (tmp_path / "summary.md").read_text() and results["duration_s"] > 0
