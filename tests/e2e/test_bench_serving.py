"""A tiny `collage bench-serving` end to end: real clusters, real load, the report's figures."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from collage_inference.bench import serving

pytestmark = pytest.mark.slow


def test_a_short_run_prints_every_figure_with_its_pairs(
    models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not (models_dir / "collage-3x3.onnx").is_file() or not (models_dir / "scnn.onnx").is_file():
        pytest.skip("the shipped scnn and collage-3x3 models are missing")
    argv = ["--rate", "50", "--requests", "60", "--repeats", "2"]
    argv += ["--sustained-rate", "60", "--sustained-requests", "150", "--json"]
    serving.main(argv)  # exits 1 when a target is missed, which a short run on a busy host may
    report = json.loads(capsys.readouterr().out)
    over, sus, page = report["overhead"], report["sustained"], report["dashboard"]
    assert over["errors"] == 0 and sus["errors"] == 0 and page["errors"] == page["page_errors"] == 0
    assert len(over["pair_overheads_p50_ms"]) == 2 and len(over["pair_overheads_p99_ms"]) == 2
    assert 0 < over["direct_p50_ms"] < 1000 and 0 < over["frontend_p50_ms"] < 1000
    assert sus["achieved_rps"] > 0.9 * 60 and sus["accuracy"] > 0.8
    assert len(page["pair_changes_p50_ms"]) == 2 and page["page_requests"] >= 2
    assert 0 < page["closed_p50_ms"] < 1000 and 0 < page["open_p50_ms"] < 1000
    names = [f["name"] for f in report["figures"]]
    finite = [math.isfinite(f["value"]) for f in report["figures"]]
    assert len(names) == 5 and all(finite[:3] + finite[4:])
    assert finite[3] == (shutil.which("chromium") is not None)  # how soon Chromium showed the page
    assert report["command"].startswith("collage bench-serving")
