"""`collage bench`: every redundancy mode under the same stragglers, side by side.

    collage bench --quick                       # ~2.5 min: the cloud trace, S = 3, 2 sweep points + 1
    collage bench                               # the full run: 46 runs (+ bracketing), ~31 min on 2 cores
    collage bench --scenarios bimodal,pareto --requests 1000 --out runs/mine

For each scenario the harness starts a fresh :class:`LocalCluster` per run and drives it with the
open-loop load generator, in this order (the stages, named as the code names them):

1. ``reference``: mode none **without** stragglers: the s-CNN's own latency and accuracy on the
   very images every other run sends (the accuracy target compares against it).
2. ``none`` with stragglers; its p50 is the fast-mode latency the replicate sweep scales.
3. ``replicate`` once per ``replicate_timeout`` in the sweep (multiples of that p50); the run with
   the lowest p99 is reported as ``replicate``, with its timeout and the whole sweep. When the
   best point is the lowest or highest of the sweep, the sweep is extended past that end (up to
   ``bracket`` more runs), so the reported best is a minimum and not an edge of the grid. The
   default sweep starts at half the fast-mode latency: at low load a short timeout re-issues
   most requests at no queueing cost, so the baseline is as strong as it can honestly be.
4. ``equal``, ``hedge`` (adaptive p95, nothing to tune), ``replicate-all`` and ``collage``.
5. The grid sweep: collage mode at every other S in ``grids`` (the main S's run is reused).

Why comparisons are fair: every run uses the same arrival schedule (loadgen seed), the same
images in the same order, and the same straggler samples (slowdown seed; worker i draws from
seed + i in every mode, and a fresh cluster per run restarts each worker's sequence). Warm-up
requests are sent on the schedule but excluded. With ``--repeats N`` each run is repeated on
a fresh cluster and the median of each statistic is reported beside its spread (airbench);
the repeats use the same seeds, so the spread is the machine's noise, not the samples'.

Noisy neighbours: before each run the harness waits (``--quiet-wait``, 60 s at most) until other
work holds at most a quarter of the CPUs, and after it computes the share of the CPUs that
work other than the benchmark and its cluster took during the run (``/proc/stat`` busy time
minus this process's and its reaped children's CPU time); a run above a quarter is run again
once (``--retry-busy``). Every run records that share and the report shows it, so a mode that
shared the machine is named as such.

After each run the front end's ``/metrics`` gives the re-issued calls per request (the real
extra work of replicate and hedge, beyond their 1/k extra workers) and the mean group size of
collage mode (how full the collages were); the report uses both to say why a target is missed.
For a per-request scenario the sampler's own figures are recorded too (``ideal``: p99 of one
draw and of the faster of two independent draws), which bound what any backup can reach.

Offered load: 50 req/s by default. On the 2-core development machine with S = 3 (9 s-CNN + 1
collage worker + front end + this client), every worker serves ~5.6 req/s at ~15 ms (0.1x
trace), about 8% busy, so queues stay short and the tail is the stragglers', not the
machine's; replicate-all (18 workers) still fits. The rate is recorded with every result.

Why not a higher load, so that groups fill: a worker is busy for its whole sampled latency
(as in the published experiments), so with k workers at utilisation u about ``9 u / L_med``
requests arrive per median latency L_med. Filling a group of k = 9 before the group deadline
(at most half the median primary latency, or the backup comes too late) needs u > 2: no
sustainable load fills 3x3 groups under this straggler model. At 50 req/s groups hold about
1.5 requests and the one collage worker serves about 30 collages/s, about half busy; a lower
rate empties its queue but fills groups even less, and the two effects about cancel (the
collage p99 moves by about a millisecond between 20 and 50 req/s), so the default stays at
50 req/s, which gives more requests per minute of benchmark.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

import collage_inference
from collage_inference.bench.loadgen import LoadConfig, LoadResult, environment, run_load_sync
from collage_inference.bench.report import MODE_ORDER, console_summary, with_targets, write_report
from collage_inference.config import DEFAULT_MODELS_DIR, REPO_ROOT, load_config
from collage_inference.data import load_dataset
from collage_inference.errors import CollageError, ConfigError
from collage_inference.serving.cluster import open_cluster
from collage_inference.serving.modes import MODES
from collage_inference.serving.slowdown import parse_sampler

TRACE_PATH = REPO_ROOT.parent / "shared" / "traces" / "cloud-latency-trace.npy"
START_COST_S = 8.5  # cluster start, drain and stop (measured on 2 cores), for the time estimate only
BUSY_SHARE = 0.25  # more of the CPUs than this busy without us: the machine is called busy


@dataclass(frozen=True)
class Scenario:
    """One straggler model: a slowdown spec and kind (see serving/slowdown.py)."""

    name: str
    spec: str
    kind: str = "per-request"
    description: str = ""
    onset_rate: float = 0.05  # per-instance only: slow periods per second per worker
    period: float = 2.0  # per-instance only: mean slow period, seconds


def builtin_scenarios(trace_path: Path = TRACE_PATH, scale: float = 0.1) -> dict[str, Scenario]:
    """The named scenarios. ``trace`` exists only when the trace file does."""
    found = {
        "bimodal": Scenario(
            "bimodal",
            f"bimodal:{scale:g}",
            description=f"The bimodal model fitted to the cloud trace, scaled {scale:g}x: 2% of calls "
            "take ~5x the median.",
        ),
        "pareto": Scenario(
            "pareto",
            "pareto:alpha=2,scale=0.01,cap=0.5",
            description="A Pareto tail (alpha 2, from 10 ms, capped at 0.5 s): median ~14 ms, p99 ~100 ms.",
        ),
        "per-instance": Scenario(
            "per-instance",
            "pareto:alpha=3,scale=0.04,cap=0.2",
            kind="per-instance",
            description="Slow periods: each worker turns slow at 0.05/s for ~2 s, adding >= 40 ms to "
            "every call in the period (a noisy neighbour).",
        ),
    }
    if trace_path.is_file():
        found = {
            "trace": Scenario(
                "trace",
                f"trace:{trace_path}:{scale:g}",
                description=f"The cloud latency trace ({trace_path.name}) scaled {scale:g}x, drawn "
                "per request: total latency = max(compute, sample).",
            ),
            **found,
        }
    return found


@dataclass(frozen=True)
class BenchConfig:
    """One `collage bench` run; see :func:`build_parser` for what each field means."""

    scenarios: tuple[Scenario, ...]
    modes: tuple[str, ...] = MODE_ORDER
    grid: int = 3
    grids: tuple[int, ...] = (2, 3, 4)
    rate: float = 50.0
    requests: int = 1500
    warmup: int = 100
    seed: int = 0
    sweep: tuple[float, ...] = (0.5, 0.75, 1.0, 1.5, 2.0)
    bracket: int = 2  # extra replicate runs allowed past a sweep end that holds the best p99
    quiet_wait: float = 60.0  # seconds to wait before a run for other work to leave the CPUs
    retry_busy: int = 1  # runs again a run during which other work took > BUSY_SHARE of the CPUs
    repeats: int = 1
    straggle_collage: bool = True
    models_dir: Path = DEFAULT_MODELS_DIR
    request_timeout: float = 5.0
    quick: bool = False
    command: str = "collage bench"
    backend: str = "local"  # local processes, or Ray Serve deployments (a private local Ray)

    def __post_init__(self) -> None:
        if not self.scenarios:
            raise ConfigError("no scenario to run; name at least one with --scenarios")
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise ConfigError(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
        if self.rate <= 0 or self.requests < 1 or self.warmup < 0 or self.repeats < 1:
            raise ConfigError("--rate must be positive, --requests and --repeats at least 1, --warmup >= 0")
        if "replicate" in self.modes and not self.sweep:
            raise ConfigError("--sweep needs at least one multiple of the fast-mode latency")
        if any(m <= 0 for m in self.sweep):
            raise ConfigError(f"--sweep multiples must be positive, got {self.sweep}")
        if self.bracket < 0 or self.retry_busy < 0 or self.quiet_wait < 0:
            raise ConfigError("bracket, --retry-busy and --quiet-wait must not be negative")

    def runs(self) -> int:
        """How many load runs this config makes (for the time estimate; bracketing the replicate
        sweep may add up to ``bracket`` more per scenario)."""
        per = 1 + sum(len(self.sweep) if m == "replicate" else 1 for m in self.modes)
        extra = len([g for g in self.grids if g != self.grid])
        return (per * len(self.scenarios) + extra) * self.repeats

    def estimate_s(self) -> float:
        return self.runs() * ((self.requests + self.warmup) / self.rate + START_COST_S)


@dataclass(frozen=True)
class RunSpec:
    """One cluster + one load run: which mode, which stragglers, which front-end settings."""

    scenario: Scenario
    mode: str
    grid: int
    stragglers: bool = True
    replicate_timeout: float | None = None


@dataclass(frozen=True)
class Images:
    """The test images every run sends, in one fixed (seeded) order, with their labels."""

    images: np.ndarray
    labels: np.ndarray
    dataset: str


def load_images(seed: int, count: int) -> Images:
    """The first ``count`` images of a seeded shuffle of the Fashion-MNIST test split."""
    test = load_dataset("fashion-mnist", "test")
    order = np.random.default_rng(seed).permutation(len(test.images))[: min(count, len(test.images))]
    return Images(np.ascontiguousarray(test.images[order]), np.asarray(test.labels)[order], test.name)


def serve_overrides(spec: RunSpec, config: BenchConfig) -> dict[str, Any]:
    """The ServeConfig keys of one run: fresh ports, no restarts (a crash must show as errors)."""
    overrides: dict[str, Any] = {
        "mode": spec.mode,
        "grid": spec.grid,
        "port": 0,
        "restart": False,
        "models_dir": config.models_dir,
        "request_timeout": config.request_timeout,
    }
    if spec.replicate_timeout is not None:
        overrides["replicate_timeout"] = spec.replicate_timeout
    if spec.stragglers:
        sc = spec.scenario
        overrides |= {
            "slowdown.spec": sc.spec,
            "slowdown.kind": sc.kind,
            "slowdown.seed": config.seed,
            "slowdown.onset_rate": sc.onset_rate,
            "slowdown.period": sc.period,
            "slowdown.collage": config.straggle_collage,
        }
    return overrides


def cdf_points(latencies_ms: np.ndarray) -> dict[str, list[float]]:
    """~200 (p, latency) points of the empirical CDF, dense in the tail (for a 1-CDF log plot)."""
    if latencies_ms.size == 0:
        return {"p": [], "ms": []}
    n = latencies_ms.size
    body = np.linspace(0.0, 0.9, 46)
    tail = 1.0 - np.logspace(-1, -np.log10(n), 150)
    ps = np.unique(np.concatenate([body, tail, [1.0]]))
    ms = np.percentile(latencies_ms, ps * 100, method="inverted_cdf")
    return {"p": [round(float(p), 6) for p in ps], "ms": [round(float(v), 3) for v in ms]}


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def run_dict(result: LoadResult, extra_cost: float, wall_s: float) -> dict[str, Any]:
    """The JSON record of one load run."""
    s = result.summary
    return {
        "p50_ms": s.p50_ms,
        "p90_ms": s.p90_ms,
        "p99_ms": s.p99_ms,
        "p999_ms": s.p999_ms,
        "mean_ms": s.mean_ms,
        "std_ms": s.std_ms,
        "max_ms": s.max_ms,
        "throughput_rps": s.throughput_rps,
        "accuracy": _finite(result.accuracy),
        "extra_cost": extra_cost,
        "sources": dict(result.source_shares),
        "errors": dict(s.errors),
        "requests": result.requests,
        "answered": result.answered,
        "send_lag_p99_ms": _finite(result.send_lag_p99_ms),
        "wall_s": round(wall_s, 2),
        "cdf": cdf_points(result.latencies_ms),
    }


def front_end_counters(url: str, sent: int) -> dict[str, float | None]:
    """From the front end's ``/metrics`` (warm-up included): re-issued s-CNN calls per request
    and the mean requests per collage group (None when not exposed or not collage mode)."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as reply:
            text = reply.read().decode()
    except (OSError, ValueError):
        return {"reissued_per_request": None, "mean_group_size": None}
    reissues = re.search(r"^collage_reissues_total\{[^}]*\} (\S+)$", text, re.M)
    sizes = [
        (int(s), float(n))
        for s, n in re.findall(r'^collage_group_size_total\{size="(\d+)"\} (\S+)$', text, re.M)
    ]
    groups = sum(n for _, n in sizes)
    return {
        "reissued_per_request": round(float(reissues.group(1)) / max(sent, 1), 4) if reissues else None,
        "mean_group_size": round(sum(s * n for s, n in sizes) / groups, 3) if groups else None,
    }


def ideal_figures(scenario: Scenario, seed: int, draws: int = 400_000) -> dict[str, float] | None:
    """The sampler's own tail, in ms: one draw (no redundancy, no overhead) against the faster of
    two independent draws (ideal full replication). Per-request scenarios only."""
    if scenario.kind != "per-request":
        return None
    sampler = parse_sampler(scenario.spec)
    if sampler is None:
        return None
    rng = np.random.default_rng(seed)
    one, two = sampler.sample(rng, draws) * 1e3, sampler.sample(rng, draws) * 1e3
    best = np.minimum(one, two)
    return {
        "p50_one_ms": round(float(np.percentile(one, 50)), 3),
        "p90_one_ms": round(float(np.percentile(one, 90)), 3),
        "p99_one_ms": round(float(np.percentile(one, 99)), 3),
        "p99_min2_ms": round(float(np.percentile(best, 99)), 3),
        "std_one_ms": round(float(one.std()), 3),
        "std_min2_ms": round(float(best.std()), 3),
    }


STATS = ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "mean_ms", "std_ms", "max_ms", "throughput_rps", "accuracy")


def median_run(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Repeats combined: each statistic's median, its [min, max] spread, the median-p99 run's CDF."""
    if len(runs) == 1:
        return dict(runs[0])
    middle = sorted(runs, key=lambda r: r["p99_ms"])[len(runs) // 2]
    out = dict(middle)
    for key in STATS:
        values = [r[key] for r in runs if r[key] is not None]
        out[key] = statistics.median(values) if values else None
    out["spread"] = {k: [min(r[k] for r in runs), max(r[k] for r in runs)] for k in ("p99_ms", "std_ms")}
    out["repeats"] = len(runs)
    return out


@dataclass
class Harness:
    """Runs the specs of one bench config against fresh clusters, with progress on stderr."""

    config: BenchConfig
    images: Images
    log: Callable[[str], None] = field(default=lambda line: print(line, file=sys.stderr, flush=True))
    started: float = field(default_factory=time.monotonic)
    done: int = 0

    def measure(self, spec: RunSpec) -> dict[str, Any]:
        """Start the cluster of ``spec``, run the load ``repeats`` times, stop it; the median run."""
        cfg = self.config
        runs = []
        for _ in range(cfg.repeats):
            serve = load_config(overrides={**serve_overrides(spec, cfg), "backend": cfg.backend})
            load = LoadConfig(
                "http://127.0.0.1:1",  # replaced with the cluster's URL below
                cfg.rate,
                cfg.requests,
                seed=cfg.seed,
                warmup=cfg.warmup,
                timeout_s=cfg.request_timeout + 5.0,
            )
            attempts: list[dict[str, Any]] = []
            for _ in range(cfg.retry_busy + 1):
                self.wait_for_quiet()
                t0, cpu0 = time.monotonic(), cpu_account()
                with open_cluster(serve) as cluster:
                    result = run_load_sync(
                        replace(load, url=cluster.url), self.images.images, self.images.labels
                    )
                    cost = cluster.extra_cost
                    counters = front_end_counters(cluster.url, cfg.requests + cfg.warmup)
                others = others_share(cpu0, cpu_account()) if cfg.backend == "local" else None
                attempts.append(
                    {**run_dict(result, cost, time.monotonic() - t0), **counters, "others_cpu_share": others}
                )
                if others is None or others <= BUSY_SHARE:
                    break
                if len(attempts) <= cfg.retry_busy:
                    self.log(f"  other work took {others:.0%} of the CPUs during this run: running it again")
            # the attempt that shared the CPUs least (the same seeds: only the machine differs)
            run = min(attempts, key=lambda r: r["others_cpu_share"] or 0.0)
            runs.append({**run, "attempts": len(attempts)})
            self.done += 1
        out = median_run(runs)
        out["mode"] = spec.mode
        label = f"{spec.mode}" + (f" @{spec.replicate_timeout * 1e3:.0f}ms" if spec.replicate_timeout else "")
        label += "" if spec.stragglers else " (no stragglers)"
        errors = sum(out["errors"].values())
        self.log(
            f"[{spec.scenario.name} S={spec.grid}] {label:<28} p50 {out['p50_ms']:7.1f}  p99 "
            f"{out['p99_ms']:7.1f}  p99.9 {out['p999_ms']:7.1f} ms  acc {out['accuracy'] or 0:.4f}  "
            f"errors {errors}  ({self.done}/{cfg.runs()} runs, {time.monotonic() - self.started:.0f} s)"
        )
        return out

    def wait_for_quiet(self) -> None:
        """Before a run, wait (up to ``quiet_wait`` seconds) until other work leaves the CPUs."""
        deadline = time.monotonic() + self.config.quiet_wait
        share = cpu_busy(1.0) if self.config.quiet_wait > 0 else None
        if share is None or share <= BUSY_SHARE:
            return
        self.log(f"  other work holds {share:.0%} of the CPUs: waiting up to {self.config.quiet_wait:g} s")
        while time.monotonic() < deadline:
            share = cpu_busy(2.0)
            if share is None or share <= BUSY_SHARE:
                return

    def scenario(self, sc: Scenario) -> dict[str, Any]:
        """Every mode of one scenario (see the module docstring for the order and why)."""
        cfg, grid = self.config, self.config.grid
        reference = self.measure(RunSpec(sc, "none", grid, stragglers=False))
        modes: dict[str, dict[str, Any]] = {}
        fast_ms = None
        if "none" in cfg.modes or "replicate" in cfg.modes:
            modes["none"] = self.measure(RunSpec(sc, "none", grid))
            fast_ms = modes["none"]["p50_ms"]
        for mode in cfg.modes:
            if mode == "none":
                continue
            if mode == "replicate":
                assert fast_ms is not None
                modes[mode] = self.replicate_sweep(sc, grid, fast_ms)
            else:
                modes[mode] = self.measure(RunSpec(sc, mode, grid))
        if "none" not in cfg.modes:
            modes.pop("none", None)
        return {
            "name": sc.name,
            "spec": sc.spec,
            "kind": sc.kind,
            "description": sc.description,
            "grid": grid,
            "k": grid * grid,
            "ideal": ideal_figures(sc, cfg.seed),
            "reference": reference,
            "modes": {m: modes[m] for m in MODE_ORDER if m in modes},
        }

    def replicate_sweep(self, sc: Scenario, grid: int, fast_ms: float) -> dict[str, Any]:
        """Mode replicate at each timeout multiple of the fast-mode latency; the lowest p99 wins."""
        points: list[tuple[float, float, dict[str, Any]]] = []

        def measure(multiple: float) -> None:
            timeout = max(round(multiple * fast_ms) / 1e3, 0.001)
            if any(t == timeout for _, t, _ in points):
                return  # rounds to a timeout already measured
            run = self.measure(RunSpec(sc, "replicate", grid, replicate_timeout=timeout))
            points.append((multiple, timeout, run))

        for multiple in self.config.sweep:
            measure(multiple)
        # Bracket the minimum: a best point at an end of the sweep may not be the best timeout.
        for _ in range(self.config.bracket if len(points) > 1 else 0):
            points.sort(key=lambda p: p[1])
            best_at = min(range(len(points)), key=lambda i: points[i][2]["p99_ms"])
            lowest_ms = points[0][1] * 1e3
            if best_at == 0 and lowest_ms > 1.0:
                before = len(points)
                measure(points[0][0] * 0.6)
                if len(points) == before:
                    break
            elif best_at == len(points) - 1:
                measure(points[-1][0] * 1.6)
            else:
                break
        points.sort(key=lambda p: p[1])
        multiple, timeout, best = min(points, key=lambda p: p[2]["p99_ms"])
        keys = ("p50_ms", "p99_ms", "p999_ms", "std_ms", "reissued_per_request")
        sweep = [{"multiple": m, "timeout_ms": t * 1e3, **{k: r.get(k) for k in keys}} for m, t, r in points]
        return {**best, "replicate_timeout_ms": timeout * 1e3, "replicate_multiple": multiple, "sweep": sweep}

    def grid_sweep(self, sc: Scenario, main: Mapping[str, Any]) -> dict[str, Any]:
        """Collage mode at each S of ``grids`` under ``sc``; skips an S whose model is missing."""
        points, notes = [], []
        for grid in sorted(set(self.config.grids)):
            model = self.config.models_dir / f"collage-{grid}x{grid}.onnx"
            if grid == self.config.grid and "collage" in main["modes"]:
                run, ref = main["modes"]["collage"], main["reference"]
            elif not model.is_file():
                notes.append(f"S={grid} skipped: {model} is missing (train it with `make models`)")
                self.log(f"[grid sweep] {notes[-1]}")
                continue
            else:
                run = self.measure(RunSpec(sc, "collage", grid))
                ref = main["reference"]  # the s-CNN's accuracy on the same images: S does not change it
            keys = ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "std_ms", "accuracy", "extra_cost", "sources")
            points.append({"grid": grid, **{k: run[k] for k in keys}, "scnn_accuracy": ref["accuracy"]})
        return {"scenario": sc.name, "points": points, "notes": notes}


def code_version() -> str:
    """The package version and the git commit (with ``-dirty`` when the tree has changes)."""
    version = f"collage-inference {collage_inference.__version__}"
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}, git {head}{'-dirty' if dirty else ''}" if head else version


def machine() -> dict[str, Any]:
    """environment() plus the CPU model and the load average (a busy machine is named as such)."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {**environment(), "cpu_model": cpu or "unknown"}


def cpu_busy(seconds: float = 1.0) -> float | None:
    """The share of all CPUs busy over ``seconds`` (from /proc/stat), measured while this process
    idles: unlike the load average it does not remember our own previous runs."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return round(1.0 - (idle1 - idle0) / max(total1 - total0, 1), 3)


def cpu_account() -> tuple[float, float, float] | None:
    """(CPU-seconds busy on the whole machine, CPU-seconds elapsed, CPU-seconds of this process and
    its reaped children) now; None where /proc/stat is missing."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:9]]  # guest time is already in user
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    t = os.times()
    idle = values[3] + values[4]  # idle + iowait
    own = t.user + t.system + t.children_user + t.children_system
    return (sum(values) - idle) / hz, sum(values) / hz, own


def others_share(
    before: tuple[float, float, float] | None, after: tuple[float, float, float] | None
) -> float | None:
    """The share of all CPUs that work other than this benchmark (and the cluster it started and
    stopped) used between two :func:`cpu_account` readings."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    busy, total, own = (a - b for a, b in zip(after, before, strict=True))
    return round(min(max((busy - own) / total, 0.0), 1.0), 3)


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def preflight(config: BenchConfig) -> None:
    """Fail in a second, not after minutes of runs: the models of the main grid must exist.
    (A grid-sweep S without its model is skipped with a note instead.)"""
    sc = config.scenarios[0]
    for mode in {"none", *config.modes}:
        load_config(overrides=serve_overrides(RunSpec(sc, mode, config.grid), config)).collage_models()
    load_config(overrides={"models_dir": config.models_dir}).scnn_model()


def run_bench(
    config: BenchConfig,
    log: Callable[[str], None] | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every scenario and the grid sweep; the ``results`` dict (targets included).

    The grid sweep runs right after the first scenario (it reuses that scenario's runs), and
    ``progress`` gets the partial results (``"partial": True``) after each scenario but the last,
    so an interrupted long run still leaves a report of what it finished."""
    preflight(config)
    before, busy_before = load_average(), cpu_busy()
    t0 = time.monotonic()
    images = load_images(config.seed, config.warmup + config.requests)
    harness = Harness(config, images) if log is None else Harness(config, images, log)
    scenarios: list[dict[str, Any]] = []
    sweep: dict[str, Any] | None = None
    for index, sc in enumerate(config.scenarios):
        scenarios.append(harness.scenario(sc))
        if index == 0 and len(set(config.grids) | {config.grid}) > 1 and "collage" in config.modes:
            sweep = harness.grid_sweep(sc, scenarios[0])
        if progress is not None and index < len(config.scenarios) - 1:
            progress(assemble(config, images, list(scenarios), sweep, t0, before, busy_before, done=False))
    return assemble(config, images, scenarios, sweep, t0, before, busy_before, done=True)


def assemble(
    config: BenchConfig,
    images: Images,
    scenarios: list[dict[str, Any]],
    sweep: dict[str, Any] | None,
    t0: float,
    before: list[float],
    busy_before: float | None,
    done: bool,
) -> dict[str, Any]:
    """The ``results`` dict of the runs so far (``partial`` until every scenario is done)."""
    after, busy_after = (load_average(), cpu_busy()) if done else ([], None)
    # Busy: something else used more than a quarter of the machine just before or after the runs.
    busy = any(b is not None and b > BUSY_SHARE for b in (busy_before, busy_after))
    results = {
        "schema": 1,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": config.command,
        "quick": config.quick,
        "partial": not done,
        "duration_s": round(time.monotonic() - t0, 1),
        "machine": {
            **machine(),
            "load_before": before,
            "load_after": after,
            "cpu_busy_before": busy_before,
            "cpu_busy_after": busy_after,
            "busy": busy,
        },
        "code_version": code_version(),
        "dataset": images.dataset,
        "load": {
            "rate_rps": config.rate,
            "arrival": "poisson",
            "requests": config.requests,
            "warmup": config.warmup,
            "seed": config.seed,
        },
        "slowdown_seed": config.seed,
        "straggle_collage": config.straggle_collage,
        "repeats": config.repeats,
        "grid": config.grid,
        "replicate_sweep_multiples": list(config.sweep),
        "scenarios": scenarios,
        "grid_sweep": sweep,
    }
    return with_targets(results)


# --- the CLI -------------------------------------------------------------------------------------

QUICK = {"requests": 400, "warmup": 50, "sweep": (0.75, 1.25), "bracket": 1, "grids": (3,)}


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="collage bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="~2 min: one scenario, S=3, fewer requests/sweep points"
    )
    p.add_argument("--scenarios", help="comma list of trace, bimodal, pareto, per-instance (default: all)")
    p.add_argument("--modes", help=f"comma list (default: all of {', '.join(MODE_ORDER)})")
    p.add_argument("--grid", type=int, default=3, help="collage side S of the mode comparison")
    p.add_argument("--grids", help="collage sides of the grid sweep (default 2,3,4; --quick: 3)")
    p.add_argument("--rate", type=float, default=50.0, help="offered load, requests per second")
    p.add_argument("--requests", type=int, help="measured requests per run (default 1500; --quick: 400)")
    p.add_argument("--warmup", type=int, help="unmeasured requests first (default 100; --quick: 50)")
    p.add_argument("--seed", type=int, default=0, help="arrival, image-order and straggler seed")
    p.add_argument(
        "--sweep",
        help="replicate timeouts as multiples of p50(none) (default 0.5,0.75,1,1.5,2; --quick: 0.75,1.25)",
    )
    p.add_argument("--repeats", type=int, default=1, help="runs per setting; medians are reported")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="seconds to wait before each run for other work to leave the CPUs (0: do not wait)",
    )
    p.add_argument(
        "--retry-busy",
        type=int,
        default=1,
        help="times to run again a run during which other work took over a quarter of the CPUs",
    )
    p.add_argument("--trace", type=Path, default=TRACE_PATH, help="the cloud latency trace (.npy)")
    p.add_argument("--trace-scale", type=float, default=0.1, help="scale of trace and bimodal delays")
    p.add_argument(
        "--no-straggle-collage",
        dest="straggle_collage",
        action="store_false",
        help="do not inject delays into the collage worker (by default it straggles like the others)",
    )
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    p.add_argument("--backend", choices=("local", "ray"), default="local", help="where the cluster runs")
    p.add_argument("--out", type=Path, help="report folder (default runs/<timestamp>/)")
    return p


def config_from_args(args: argparse.Namespace, argv: Sequence[str]) -> BenchConfig:
    if args.trace_scale <= 0:
        raise ConfigError(f"--trace-scale must be positive, got {args.trace_scale}")
    known = builtin_scenarios(args.trace, args.trace_scale)
    if args.scenarios:
        names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
        if "trace" in names and "trace" not in known:
            raise ConfigError(f"scenario trace needs {args.trace}; give --trace PATH or use bimodal")
        unknown = [n for n in names if n not in known and n != "trace"]
        if unknown:
            raise ConfigError(f"unknown scenario(s) {unknown}; choose from trace, {', '.join(known)}")
    else:
        names = [next(iter(known))] if args.quick else list(known)
    quick = QUICK if args.quick else {}
    return BenchConfig(
        scenarios=tuple(known[n] for n in names),
        modes=tuple(m.strip() for m in args.modes.split(",")) if args.modes else MODE_ORDER,
        grid=args.grid,
        grids=_ints(args.grids) if args.grids else quick.get("grids", (2, 3, 4)),
        rate=args.rate,
        requests=args.requests or quick.get("requests", 1500),
        warmup=args.warmup if args.warmup is not None else quick.get("warmup", 100),
        seed=args.seed,
        sweep=_floats(args.sweep) if args.sweep else quick.get("sweep", (0.5, 0.75, 1.0, 1.5, 2.0)),
        bracket=quick.get("bracket", 2),
        repeats=args.repeats,
        quiet_wait=args.quiet_wait,
        retry_busy=args.retry_busy,
        straggle_collage=args.straggle_collage,
        models_dir=args.models_dir,
        quick=args.quick,
        command=" ".join(["collage bench", *argv]),
        backend=args.backend,
    )


def default_out_dir() -> Path:
    return REPO_ROOT / "runs" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def execute(config: BenchConfig, out_dir: Path) -> tuple[dict[str, Any], list[Path]]:
    """Run, write the report folder, print the tables; the results and the files written."""
    preflight(config)
    print(
        f"collage bench: {config.runs()} runs, about {config.estimate_s() / 60:.1f} min; report in {out_dir}",
        file=sys.stderr,
        flush=True,
    )

    def partial(results: dict[str, Any]) -> None:
        write_report(results, out_dir)
        print(f"collage bench: partial report in {out_dir / 'summary.md'}", file=sys.stderr, flush=True)

    results = run_bench(config, progress=partial)
    files = write_report(results, out_dir)
    print(console_summary(results))
    if results["machine"]["busy"]:
        m = results["machine"]
        print(
            f"\nnote: the machine was busy ({m['cpu_busy_before'] or 0:.0%} of the CPUs busy before the "
            f"runs, {m['cpu_busy_after'] or 0:.0%} after, without this benchmark): do not trust the latencies"
        )
    print(f"\nreport: {out_dir / 'summary.md'} ({len(files)} files, {results['duration_s'] / 60:.1f} min)")
    return results, files


def main(argv: list[str] | None = None) -> int:
    """0 when every measured target is met, 1 when one is missed, 2 on a bad flag or setup."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args, argv)
        results, _ = execute(config, args.out or default_out_dir())
    except CollageError as exc:
        print(f"collage bench: error: {exc}", file=sys.stderr)
        return 2
    met = [t["met"] for sc in results["scenarios"] for t in sc["targets"]]
    return 1 if False in met else 0


if __name__ == "__main__":
    sys.exit(main())
