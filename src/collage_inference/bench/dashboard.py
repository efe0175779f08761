"""What the live page costs and how soon it is usable, for `collage bench-serving`.

* **Cost**: a front end in collage mode (S = 2, no stragglers) under the same open-loop load, in
  runs without and with a page open, alternating (AB BA ...) so that drift hits both alike; the
  change is the median of the pairs' own p50 (and p99) differences. "A page open" is a client
  making exactly the page's requests (``/dashboard/state`` and ``/dashboard/queries`` once a
  second), so the figure is the front end's own cost of being watched, with the backup queries
  kept and drawn as PNGs for it; a browser's rendering is left out.
* **Usable**: a real headless Chromium (Debian's ``chromium``) opens the page of that cluster
  under load; the time from starting the browser to its DOM holding the first figures bounds the
  time a person waits (browser start-up included).
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from collage_inference.bench.loadgen import LoadConfig, LoadResult, run_load_sync, warmup_for
from collage_inference.config import load_config
from collage_inference.deploy.local import LocalCluster
from collage_inference.errors import ConfigError

PAGE_PATHS = ("/dashboard/state", "/dashboard/queries")  # what the page asks for every second
CHROMIUM = "chromium"


@contextmanager
def page_open(url: str, interval: float = 1.0) -> Iterator[list[int]]:
    """While inside, a thread asks for what the open page asks for, every ``interval`` seconds;
    yields the list of HTTP statuses it got (for the caller to check)."""
    statuses: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for path in PAGE_PATHS:
                try:
                    with urllib.request.urlopen(url + path, timeout=5) as reply:
                        reply.read()
                        statuses.append(reply.status)
                except OSError:
                    statuses.append(0)
            stop.wait(interval)

    thread = threading.Thread(target=watch, name="page", daemon=True)
    thread.start()
    try:
        yield statuses
    finally:
        stop.set()
        thread.join()


def chromium_dom(url: str, budget_ms: int = 3000, screenshot: Path | None = None) -> tuple[str, float]:
    """Open ``url`` in headless Chromium and return (its DOM once the page's scripts have had
    ``budget_ms`` of virtual time, seconds from starting the browser). ``screenshot``: also write
    a PNG of the page there (a second browser run)."""
    if shutil.which(CHROMIUM) is None:
        raise ConfigError("chromium is not installed; `sudo apt-get install chromium` (or `make setup`)")
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--virtual-time-budget={budget_ms}"]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=60, check=True)
    seconds = time.monotonic() - started
    if screenshot is not None:
        subprocess.run([*base, "--window-size=1200,1250", f"--screenshot={screenshot}", url],
                       capture_output=True, timeout=60, check=True)  # fmt: skip
    return done.stdout, seconds


def _run(url: str, rate: float, requests: int, seed: int, images, labels) -> LoadResult:
    config = LoadConfig(url, rate, requests, seed=seed, warmup=warmup_for(requests))
    return run_load_sync(config, images, labels)


def dashboard_cost(rate: float, requests: int, repeats: int, images, labels) -> dict:
    """p50/p99 of a collage front end without and with the page open (module docstring), and
    the seconds a headless Chromium took to show the page's first figures (None without one)."""
    with LocalCluster(load_config(overrides={"mode": "collage", "grid": 2, "port": 0})) as cluster:
        closed, opened, statuses = [], [], []
        for i in range(repeats):
            for side in ("closed", "open") if i % 2 == 0 else ("open", "closed"):
                if side == "closed":
                    closed.append(_run(cluster.url, rate, requests, i, images, labels).summary)
                    continue
                with page_open(cluster.url) as got:
                    opened.append(_run(cluster.url, rate, requests, i, images, labels).summary)
                statuses += got
        ready_s = None
        if shutil.which(CHROMIUM):
            load = threading.Thread(target=_run, args=(cluster.url, rate / 4, requests, 99, images, labels))
            load.start()
            time.sleep(1.0)
            dom, ready_s = chromium_dom(f"{cluster.url}/dashboard", budget_ms=1500)
            load.join()
            if 'data-key="answered"' not in dom:
                ready_s = None  # the page never showed its figures
    p50 = [o.p50_ms - c.p50_ms for c, o in zip(closed, opened, strict=True)]
    p99 = [o.p99_ms - c.p99_ms for c, o in zip(closed, opened, strict=True)]
    return {
        "rate_rps": rate,
        "requests_per_run": requests,
        "repeats": repeats,
        "closed_p50_ms": statistics.median(s.p50_ms for s in closed),
        "open_p50_ms": statistics.median(s.p50_ms for s in opened),
        "change_p50_ms": statistics.median(p50),
        "change_p99_ms": statistics.median(p99),
        "pair_changes_p50_ms": p50,
        "page_requests": len(statuses),
        "page_errors": sum(status != 200 for status in statuses),
        "errors": sum(s.error_count for s in closed + opened),
        "chromium_ready_s": ready_s,
    }
