"""Faults and overload under steady load, each ending with an exact accounting of every request.

    collage faults                 # the fault suite: about 30 s of load plus start-up
    collage faults --soak 60       # then a minute at twice the sustainable rate

**The fault suite.** A local cluster in ``collage`` mode (S = 2: four s-CNN workers and one
collage worker) takes open-loop load from real test images while, one phase after another, an
s-CNN worker is killed (SIGKILL; the launcher restarts it on its port), one hangs (accepts
requests, never answers), one answers garbage, the collage worker drops every connection, and
one is restarted on a new port (the launcher tells the front end). Each fault hits the s-CNN
worker the front end sent most calls to in the second before (its least-loaded pick favours
the fastest worker at light load, so a fixed victim could go untouched). Hangs, garbage and
dropped connections come from a chaos proxy (:mod:`~collage_inference.bench.chaos`) in front of
every worker. Every request the client sent is then accounted for,
per phase: answered (by source), refused or failed with a clear status (429, 502, 503, 504),
or **lost** (no HTTP answer: a dropped connection, a client timeout). The front end's own
counters are compared with the client's: an answer the front end gave that no client received
would be a **duplicate** or a loss. Both must be zero.

**The soak.** Workers that each take a fixed 50 ms per call give the cluster a known capacity
(four workers: 80 requests/s), low enough that the load generator sharing the machine keeps
its schedule; the load offers twice that for the whole run. The front
end must shed the excess with 429 (and ``Retry-After``) at its in-flight bound instead of
letting queues and latency grow, lose and duplicate nothing, and end with its memory back
where it started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from collage_inference.bench.loadgen import LoadConfig, RequestRecord, environment, run_load
from collage_inference.config import DEFAULT_MODELS_DIR, REPO_ROOT, ServeConfig, SlowdownSettings
from collage_inference.data import load_dataset
from collage_inference.deploy.local import LocalCluster
from collage_inference.deploy.process import ManagedProcess, wait_all_ready
from collage_inference.errors import CollageError
from collage_inference.serving.metrics import metric_total, parse_metrics

CLEAR_STATUSES = ("429", "502", "503", "504")
SOURCES = ("primary", "collage", "replica")
COLLAGE = "collage-0"


@dataclass(frozen=True)
class Phase:
    """A slice of the load's span (as fractions) and the fault injected during it."""

    name: str
    start: float
    end: float
    what: str


PHASES = (
    Phase("steady", 0.00, 0.10, "no fault"),
    Phase("kill", 0.10, 0.25, "an s-CNN worker SIGKILLed; the launcher restarts it on its port"),
    Phase("hang", 0.25, 0.45, "an s-CNN worker accepts requests and never answers"),
    Phase("garbage", 0.45, 0.60, "an s-CNN worker answers 200 with random bytes"),
    Phase("collage-down", 0.60, 0.80, "the collage worker drops every connection"),
    Phase("move", 0.80, 1.00, "an s-CNN worker restarts on a new port; the front end is told"),
)

COLLAGE_DOWN = [p.name for p in PHASES].index("collage-down")


@dataclass
class Accounting:
    """Where every request of one phase (or of the whole run) went."""

    phase: str
    sent: int = 0
    answered: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES, 0))
    refused: dict[str, int] = field(default_factory=dict)  # clear HTTP statuses
    lost: dict[str, int] = field(default_factory=dict)  # no HTTP answer, by client-side cause
    correct: int = 0

    def add(self, record: RequestRecord) -> None:
        if record.sent_s is None:
            return  # never sent (client overflow or past the run): not the server's to answer
        self.sent += 1
        if record.status == "ok":
            key = record.source or "unreported"
            self.answered[key] = self.answered.get(key, 0) + 1
            self.correct += bool(record.correct)
        elif record.status in CLEAR_STATUSES:
            self.refused[record.status] = self.refused.get(record.status, 0) + 1
        else:
            self.lost[record.status] = self.lost.get(record.status, 0) + 1

    @property
    def n_answered(self) -> int:
        return sum(self.answered.values())

    @property
    def n_refused(self) -> int:
        return sum(self.refused.values())

    @property
    def n_lost(self) -> int:
        return sum(self.lost.values())


def account(records: tuple[RequestRecord, ...], span: float, phases: tuple[Phase, ...]) -> list[Accounting]:
    """Per-phase accounting (by scheduled time) and a final ``all`` row."""
    rows = [Accounting(p.name) for p in phases]
    overall = Accounting("all")
    for record in records:
        overall.add(record)
        if record.warmup:
            continue
        index = phase_index(record.scheduled_s / span if span > 0 else 0.0, phases)
        if index is not None:
            rows[index].add(record)
    return [*rows, overall]


def phase_index(fraction: float, phases: tuple[Phase, ...]) -> int | None:
    """The phase a point of the load's span (as a fraction) falls in; past the end, the last."""
    for i, phase in enumerate(phases):
        if phase.start <= fraction < phase.end:
            return i
    return len(phases) - 1 if phases and fraction >= phases[-1].end else None


def format_accounting(rows: list[Accounting], duplicated: int) -> str:
    """The accounting as a markdown table."""
    lines = [
        "| phase | sent | primary | collage | replica | refused (status) | lost | accuracy |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in rows:
        refused = ", ".join(f"{n}x{s}" for s, n in sorted(r.refused.items())) or "0"
        lost = str(r.n_lost) + (f" ({', '.join(f'{n} {k}' for k, n in r.lost.items())})" if r.lost else "")
        accuracy = f"{r.correct / r.n_answered:.1%}" if r.n_answered else "n/a"
        a = r.answered
        lines.append(
            f"| {r.phase} | {r.sent} | {a['primary']} | {a['collage']} | {a['replica']} | {refused} | "
            f"{lost} | {accuracy} |"
        )
    lines.append(f"\nduplicated answers: {duplicated}")
    return "\n".join(lines)


# --- talking to the cluster ---------------------------------------------------------------------


async def fetch_metrics(session: aiohttp.ClientSession, url: str) -> dict[tuple[str, str], float]:
    """The front end's /metrics as {(name, labels): value}."""
    async with session.get(f"{url}/metrics") as response:
        return parse_metrics(await response.text())


def resolved_by_frontend(before: dict, after: dict) -> int:
    """Requests the front end settled (answered, failed, or shed) between two scrapes."""
    names = ("nv_inference_request_success_total", "nv_inference_request_failure_total", "collage_shed_total")
    return int(sum(metric_total(after, n) - metric_total(before, n) for n in names))


def rss_mb(pid: int) -> float:
    """Resident memory of a process, MiB (from /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return math.nan


class ChaosProcess(ManagedProcess):
    """A chaos proxy process in front of ``target``: a tool driven by flags, not a settings file."""

    def __init__(self, name: str, target: str) -> None:
        super().__init__(name, "collage_inference.bench.chaos", write_settings=None)
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


# --- the fault suite ----------------------------------------------------------------------------


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


def _cluster_config(models_dir: Path, **overrides: Any) -> ServeConfig:
    return ServeConfig(
        mode="collage", grid=2, models_dir=models_dir, port=0, request_timeout=5.0, **overrides
    )


def run_fault_suite(
    rate: float = 60.0, seconds: float = 30.0, models_dir: Path = DEFAULT_MODELS_DIR, seed: int = 0
) -> FaultReport:
    """Start a cluster, run the phases of :data:`PHASES` under load, and account for everything."""
    test = load_dataset("fashion-mnist", "test")
    proxies = Proxies()
    config = _cluster_config(models_dir)
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


# --- the soak -------------------------------------------------------------------------------------

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
    config = _cluster_config(models_dir, slowdown=slowdown, max_pending=max_pending)
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


# --- the command --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="collage faults", description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=60.0, help="offered load of the fault suite, req/s")
    p.add_argument("--seconds", type=float, default=30.0, help="length of the fault suite's load")
    p.add_argument("--soak", type=float, default=0.0, metavar="SECONDS", help="also soak for this long")
    p.add_argument("--no-faults", action="store_true", help="only the soak")
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    p.add_argument("--out", type=Path, help="report folder (default runs/faults-<time>)")
    return p


def main(argv: list[str] | None = None) -> int:
    """0 when nothing was lost or duplicated, 1 otherwise, 2 on a setup error."""
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # unwind: the cluster stops its processes
    out = args.out or REPO_ROOT / "runs" / f"faults-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    results: dict[str, Any] = {"environment": environment(), "date": datetime.now(UTC).isoformat()}
    clean = True
    try:
        if not args.no_faults:
            report = run_fault_suite(args.rate, args.seconds, args.models_dir)
            print(f"fault suite: {report.rate:g} req/s for {report.seconds:.0f} s")
            for phase in PHASES:
                print(f"  {phase.name:13s} {phase.what}")
            print(format_accounting(report.rows, report.duplicated))
            print(
                f"readiness statuses seen {report.ready_statuses}; degraded while the collage worker "
                f"was down: {report.degraded_seen}; all workers up again after "
                f"{report.recovered_s if report.recovered_s is None else round(report.recovered_s, 1)} s"
            )
            results["faults"] = report.to_dict()
            clean &= report.lost == 0 and report.duplicated == 0
        if args.soak > 0:
            soak = run_soak(args.soak, models_dir=args.models_dir)
            print("soak:\n" + format_soak(soak))
            results["soak"] = soak.to_dict()
            clean &= soak.accounting.n_lost == 0 and soak.duplicated == 0
    except CollageError as exc:
        print(f"collage faults: error: {exc}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"report: {out / 'results.json'}")
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
