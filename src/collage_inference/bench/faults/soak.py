"""The soak: workers that each take a fixed 50 ms per call give the cluster a known capacity (four
workers: 80 requests/s), low enough that the load generator sharing the machine keeps its
schedule; the load offers twice that for the whole run. The front end must shed the excess with
429 (and ``Retry-After``) at its in-flight bound instead of letting queues and latency grow,
lose and duplicate nothing, and end with its memory back where it started.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from collage_inference.bench.faults.accounting import (
    Accounting,
    account,
    cluster_config,
    fetch_metrics,
    resolved_by_frontend,
    rss_mb,
)
from collage_inference.bench.loadgen import LoadConfig, run_load
from collage_inference.config import DEFAULT_MODELS_DIR, SlowdownSettings
from collage_inference.data import load_dataset
from collage_inference.deploy.local import LocalCluster
from collage_inference.serving.metrics import metric_total

WORKER_DELAY_S = 0.05  # every call takes this long: the cluster's capacity is known (80 req/s)


@dataclass
class SoakReport:
    offered_rps: float
    capacity_rps: float
    seconds: float
    accounting: Accounting
    duplicated: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    server_p99_ms: float  # inside the front end, admission to answer: what max_pending bounds
    rss_start_mb: float
    rss_peak_mb: float
    rss_end_mb: float
    max_in_flight: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_soak(
    seconds: float = 60.0, factor: float = 2.0, models_dir: Path = DEFAULT_MODELS_DIR, max_pending: int = 64
) -> SoakReport:
    """Offer ``factor`` times the cluster's capacity for ``seconds``; account and measure memory."""
    test = load_dataset("fashion-mnist", "test")
    delay = f"pareto:alpha=50,scale={WORKER_DELAY_S},cap={WORKER_DELAY_S * 1.05:g}"
    slowdown = SlowdownSettings(delay, collage=True)
    config = cluster_config(models_dir, slowdown=slowdown, max_pending=max_pending)
    with LocalCluster(config) as cluster:
        capacity = len(cluster.scnn) / WORKER_DELAY_S
        return asyncio.run(_soak(cluster, test, capacity, factor, seconds, max_pending))


async def _soak(cluster: LocalCluster, test, capacity: float, factor: float, seconds: float, cap: int):
    url, pid = cluster.url, cluster.frontend.pid if cluster.frontend else None
    assert pid is not None
    rate = capacity * factor
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        # The baseline is taken after a few seconds of the same overload, so it includes what the
        # allocator keeps once warm: a leak shows as growth beyond it, warm-up does not.
        warm = LoadConfig(url, rate, int(rate * 5), seed=1, timeout_s=10.0, max_in_flight=4096)
        await run_load(warm, test.images, test.labels)
        await asyncio.sleep(2.0)
        start_rss, peak = rss_mb(pid), 0.0
        before = await fetch_metrics(session, url)
        load = LoadConfig(url, rate, int(rate * seconds), seed=2, timeout_s=10.0, max_in_flight=4096)
        loading = asyncio.create_task(run_load(load, test.images, test.labels))
        in_flight = 0
        while not loading.done():
            peak = max(peak, rss_mb(pid))
            found = await fetch_metrics(session, url)
            in_flight = max(in_flight, int(metric_total(found, "collage_requests_in_flight")))
            await asyncio.sleep(0.5)
        result = await loading
        await asyncio.sleep(2.0)
        after = await fetch_metrics(session, url)
        end_rss = rss_mb(pid)
    (overall,) = account(result.records, 1.0, ())
    responses = overall.n_answered + overall.n_refused
    ok = np.sort(np.array([r.latency_s for r in result.records if r.status == "ok"]) * 1e3)
    inside = np.array([r.timings["latency_ms"] for r in result.records if "latency_ms" in r.timings])
    return SoakReport(
        offered_rps=rate,
        capacity_rps=capacity,
        seconds=seconds,
        accounting=overall,
        duplicated=max(resolved_by_frontend(before, after) - responses - overall.n_lost, 0),
        p50_ms=float(np.percentile(ok, 50)) if ok.size else math.nan,
        p99_ms=float(np.percentile(ok, 99)) if ok.size else math.nan,
        max_ms=float(ok[-1]) if ok.size else math.nan,
        server_p99_ms=float(np.percentile(inside, 99)) if inside.size else math.nan,
        rss_start_mb=start_rss,
        rss_peak_mb=peak,
        rss_end_mb=end_rss,
        max_in_flight=in_flight,
    )


def format_soak(report: SoakReport) -> str:
    a = report.accounting
    refused = ", ".join(f"{n}x{s}" for s, n in sorted(a.refused.items())) or "0"
    return "\n".join(
        [
            f"offered {report.offered_rps:.0f} req/s for {report.seconds:.0f} s "
            f"(capacity about {report.capacity_rps:.0f} req/s)",
            f"sent {a.sent}, answered {a.n_answered}, refused {refused}, lost {a.n_lost}, "
            f"duplicated {report.duplicated}",
            f"answered latency ms: p50 {report.p50_ms:.1f}, p99 {report.p99_ms:.1f}, "
            f"max {report.max_ms:.1f}; inside the front end p99 {report.server_p99_ms:.1f}; "
            f"in flight at most {report.max_in_flight}",
            f"front-end memory MiB: start {report.rss_start_mb:.1f}, peak {report.rss_peak_mb:.1f}, "
            f"end {report.rss_end_mb:.1f}",
        ]
    )
