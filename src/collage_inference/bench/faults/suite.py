"""The fault suite (about 30 s of load plus start-up). A local cluster in ``collage`` mode (S = 2:
four s-CNN workers and one collage worker) takes open-loop load from real test images while, one
phase after another, an s-CNN worker is killed (SIGKILL; the launcher restarts it on its port),
one hangs (accepts requests, never answers), one answers garbage, the collage worker drops every
connection, and one is restarted on a new port (the launcher tells the front end). Each fault
hits the s-CNN worker the front end sent most calls to in the second before (its least-loaded
pick favours the fastest worker at light load, so a fixed victim could go untouched). Hangs,
garbage and dropped connections come from a chaos proxy (:mod:`.chaos`) in front of every
worker. Every request the client sent is then accounted for, per phase: answered (by source),
refused or failed with a clear status (429, 502, 503, 504), or **lost** (no HTTP answer: a
dropped connection, a client timeout). The front end's own counters are compared with the
client's: an answer the front end gave that no client received would be a **duplicate** or a
loss. Both must be zero.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from collage_inference.bench.faults.accounting import (
    Accounting,
    Phase,
    account,
    cluster_config,
    fetch_metrics,
    phase_index,
    resolved_by_frontend,
)
from collage_inference.bench.loadgen import LoadConfig, run_load
from collage_inference.config import DEFAULT_MODELS_DIR
from collage_inference.data import load_dataset
from collage_inference.deploy.local import LocalCluster
from collage_inference.deploy.process import ManagedProcess, wait_all_ready
from collage_inference.serving.metrics import metric_total

COLLAGE = "collage-0"

PHASES = (
    Phase("steady", 0.00, 0.10, "no fault"),
    Phase("kill", 0.10, 0.25, "an s-CNN worker SIGKILLed; the launcher restarts it on its port"),
    Phase("hang", 0.25, 0.45, "an s-CNN worker accepts requests and never answers"),
    Phase("garbage", 0.45, 0.60, "an s-CNN worker answers 200 with random bytes"),
    Phase("collage-down", 0.60, 0.80, "the collage worker drops every connection"),
    Phase("move", 0.80, 1.00, "an s-CNN worker restarts on a new port; the front end is told"),
)

COLLAGE_DOWN = [p.name for p in PHASES].index("collage-down")


class ChaosProcess(ManagedProcess):
    """A chaos proxy process in front of ``target``: a tool driven by flags, not a settings file."""

    def __init__(self, name: str, target: str) -> None:
        super().__init__(name, "collage_inference.bench.faults.chaos", write_settings=None)
        self.target = target

    def arguments(self) -> list[str]:
        return ["--target", self.target, "--port", str(self.port)]


class Proxies:
    """Chaos proxies in front of the workers, started as the cluster asks for addresses."""

    def __init__(self) -> None:
        self.procs: dict[str, ManagedProcess] = {}

    def interpose(self, name: str, url: str) -> str:
        proc = ChaosProcess(f"chaos-{name}", url)
        proc.start()
        self.procs[name] = proc
        wait_all_ready([proc], 30.0, lambda: False)
        assert proc.url is not None
        return proc.url

    async def set(self, session: aiohttp.ClientSession, name: str, mode: str) -> None:
        async with session.put(f"{self.procs[name].url}/_chaos", json={"mode": mode}) as response:
            response.raise_for_status()

    async def counts(self, session: aiohttp.ClientSession) -> dict[str, dict[str, int]]:
        """Requests each proxy handled in each mode: proof that the faults met traffic."""
        found = {}
        for name, proc in self.procs.items():
            async with session.get(f"{proc.url}/_chaos") as response:
                found[name] = (await response.json())["counts"]
        return found

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            proc.reap(time.monotonic() + 5.0)


@dataclass
class FaultReport:
    rows: list[Accounting]
    duplicated: int
    frontend_resolved: int
    client_responses: int
    victims: dict[str, str]  # phase -> the worker it hit
    degraded_seen: bool  # readiness said "degraded" while the collage worker was down
    collage_down_seen: bool  # /metrics showed collage-0 down then
    ready_statuses: list[int]  # /v2/health/ready statuses sampled through the run
    recovered_s: float | None  # after the load: seconds until every worker was up again
    chaos_counts: dict[str, dict[str, int]]  # per proxy, requests it handled in each mode
    events: list[str]
    rate: float
    seconds: float

    @property
    def lost(self) -> int:
        return self.rows[-1].n_lost

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["lost"] = self.lost
        return data


def run_fault_suite(
    rate: float = 60.0, seconds: float = 30.0, models_dir: Path = DEFAULT_MODELS_DIR, seed: int = 0
) -> FaultReport:
    """Start a cluster, run the phases of :data:`PHASES` under load, and account for everything."""
    test = load_dataset("fashion-mnist", "test")
    proxies = Proxies()
    config = cluster_config(models_dir)
    try:
        with LocalCluster(config, interpose=proxies.interpose) as cluster:
            report = asyncio.run(_faults_under_load(cluster, proxies, test, rate, seconds, seed))
    finally:
        proxies.stop()
    return report


async def _faults_under_load(
    cluster: LocalCluster, proxies: Proxies, test, rate: float, seconds: float, seed: int
) -> FaultReport:
    url = cluster.url
    requests = max(int(rate * seconds), len(PHASES) * 10)
    span = requests / rate
    load = LoadConfig(url, rate, requests, seed=seed, warmup=20, timeout_s=15.0)
    ready_statuses: list[int] = []
    seen = {"degraded": False, "collage_down": False}
    calls: list[tuple[float, dict[str, float]]] = []  # (time, calls per s-CNN worker) samples
    victims: dict[str, str] = {}

    def busiest(phase: str) -> str:
        """The s-CNN worker with the most calls over the last second of samples."""
        now, latest = calls[-1]
        earlier = next((c for t, c in reversed(calls) if now - t >= 1.0), calls[0][1])
        victims[phase] = max(latest, key=lambda w: (latest[w] - earlier.get(w, 0), w))
        return victims[phase]

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        before = await fetch_metrics(session, url)
        started = time.perf_counter() + 20 / rate  # the warm-up goes first
        loading = asyncio.create_task(run_load(load, test.images, test.labels))

        async def at(fraction: float) -> None:
            await asyncio.sleep(max(started + fraction * span - time.perf_counter(), 0))

        async def watch() -> None:
            while not loading.done():
                async with session.get(f"{url}/v2/health/ready") as response:
                    ready_statuses.append(response.status)
                    doc = await response.json()
                found = await fetch_metrics(session, url)
                calls.append((time.perf_counter(), _scnn_calls(found)))
                if phase_index((time.perf_counter() - started) / span, PHASES) == COLLAGE_DOWN:
                    seen["degraded"] |= bool(doc.get("degraded"))
                    seen["collage_down"] |= (
                        metric_total(found, "collage_worker_up", 'worker="collage-0"') == 0
                    )
                await asyncio.sleep(0.1)

        watching = asyncio.create_task(watch())
        phase = {p.name: p for p in PHASES}
        await at(phase["kill"].start)
        cluster.kill_worker(_index(busiest("kill")))
        await at(phase["hang"].start)
        await proxies.set(session, hung := busiest("hang"), "hang")
        await at(phase["hang"].end)
        await proxies.set(session, hung, "pass")
        await proxies.set(session, broken := busiest("garbage"), "garbage")
        await at(phase["garbage"].end)
        await proxies.set(session, broken, "pass")
        victims["collage-down"] = COLLAGE
        await proxies.set(session, COLLAGE, "down")
        await at(phase["collage-down"].end)
        await proxies.set(session, COLLAGE, "pass")
        await asyncio.to_thread(cluster.move_worker, _index(busiest("move")))
        result = await loading
        await watching
        recovered = await _wait_all_up(session, url, cluster, timeout=30.0)
        after = await fetch_metrics(session, url)
        chaos_counts = await proxies.counts(session)
    rows = account(result.records, span, PHASES)
    overall = rows[-1]
    client_responses = overall.n_answered + overall.n_refused
    frontend_resolved = resolved_by_frontend(before, after)
    return FaultReport(
        rows=rows,
        duplicated=max(frontend_resolved - client_responses - overall.n_lost, 0),
        frontend_resolved=frontend_resolved,
        client_responses=client_responses,
        degraded_seen=seen["degraded"],
        collage_down_seen=seen["collage_down"],
        ready_statuses=sorted(set(ready_statuses)),
        recovered_s=recovered,
        victims=victims,
        chaos_counts=chaos_counts,
        events=list(cluster.events),
        rate=rate,
        seconds=span,
    )


def _scnn_calls(found: dict[tuple[str, str], float]) -> dict[str, float]:
    out = {}
    for (name, labels), value in found.items():
        match = re.search(r'worker="(scnn-\d+)"', labels)
        if name == "collage_worker_calls_total" and match:
            out[match[1]] = value
    return out


def _index(worker_id: str) -> int:
    return int(worker_id.removeprefix("scnn-"))


async def _wait_all_up(
    session: aiohttp.ClientSession, url: str, cluster: LocalCluster, timeout: float
) -> float | None:
    """Seconds until /metrics shows every worker up (the probes brought them back); None if never."""
    start = time.perf_counter()
    workers = len(cluster.scnn) + len(cluster.collage)
    while time.perf_counter() - start < timeout:
        found = await fetch_metrics(session, url)
        if metric_total(found, "collage_worker_up") == workers:
            return time.perf_counter() - start
        await asyncio.sleep(0.2)
    return None
