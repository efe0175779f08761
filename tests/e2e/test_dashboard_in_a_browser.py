"""The live page in a real browser: headless Chromium (Debian's ``chromium``, which ``make setup``
installs where it can) opens ``/dashboard`` of a running cluster under load, twice; the page
shows numbers that move and the latest collages with their labels. A screenshot is written to
``$COLLAGE_SCREENSHOT`` when set (the README's), else beside the test's temporary files."""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

from collage_inference.bench.dashboard import chromium_dom
from collage_inference.bench.loadgen import LoadConfig, run_load_sync
from collage_inference.config import ServeConfig, SlowdownSettings
from collage_inference.deploy.local import LocalCluster

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("chromium") is None, reason="chromium is not installed (`sudo apt-get install chromium`)"
    ),
]


def tile(dom: str, key: str) -> int:
    found = re.search(rf'data-key="{key}"><div class="v">(\d+)<', dom)
    assert found, f"no {key} tile in the page"
    return int(found[1])


def test_the_page_shows_a_cluster_at_work(models_dir: Path, fashion_test, tmp_path: Path) -> None:
    straggler = SlowdownSettings("pareto:alpha=50,scale=0.3,cap=0.4", workers=(0,))
    # A fixed group deadline fills the collages (the adaptive one sends them early at this load).
    config = ServeConfig(
        mode="collage", grid=3, group_timeout=0.05, models_dir=models_dir, port=0, slowdown=straggler
    )
    images, labels = fashion_test.images[:1500], fashion_test.labels[:1500]
    screenshot = Path(os.environ.get("COLLAGE_SCREENSHOT", tmp_path / "dashboard.png"))
    with LocalCluster(config) as cluster:
        load = LoadConfig(cluster.url, rate=120, requests=1400, warmup=0, seed=2)
        loader = threading.Thread(target=run_load_sync, args=(load, images, labels))
        loader.start()
        try:
            time.sleep(3.0)
            first, _ = chromium_dom(f"{cluster.url}/dashboard")
            time.sleep(1.0)
            second, _ = chromium_dom(f"{cluster.url}/dashboard", screenshot=screenshot)
        finally:
            loader.join()
    assert '<div id="error"></div>' in second  # every poll answered
    assert 0 < tile(first, "answered") < tile(second, "answered")  # numbers that move
    assert tile(second, "answers-primary") > 0
    assert "mode collage" in second and "S = 3" in second
    for worker in [f"scnn-{i}" for i in range(9)] + ["collage-0"]:
        assert f"<td>{worker}</td>" in second
    # the latest collages as pictures, their cells labelled with class names
    assert second.count('src="data:image/png;base64,') >= 1
    cells = re.findall(r'<div class="cell[^"]*" title="r\d+">([^<]*)</div>', second)
    assert cells and set(cells) & set(fashion_test.class_names)
    assert "<polyline" in second  # the latency chart
    assert screenshot.stat().st_size > 10_000
