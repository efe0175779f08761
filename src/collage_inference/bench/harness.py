"""The harness: one fresh cluster and one open-loop load run per setting, the baselines tuned.

At every load point (an arrival pattern at a utilisation of the k s-CNN workers) the harness
runs, in this order:

1. ``none``: its p50 is the fast-mode latency the replicate sweep scales;
2. ``replicate`` at each timeout of the sweep (multiples of that p50) and for each re-issue
   target (the least-loaded worker, or only an idle one); the setting with the lowest p99 is
   reported as ``replicate``, with the whole sweep. A best setting at an end of the sweep is
   extended past that end (up to ``bracket`` more runs), so the reported best is a minimum;
3. ``hedge`` (a second copy past the running p95) for each re-issue target, the best reported;
4. ``equal``, ``replicate-all``, ``collage`` and the extra collage rows, each its own row:
   ``collage-2`` (two collage workers, 2/k), other decoder policies (``collage (patient)``:
   every cell waits for its primary to be due), other S;
5. ``parm`` (ParM, the closest peer) at each parity k, over the same k s-CNN workers, with
   ``collage S=2`` beside it: ParM's k = 4 is the collage's S = 2.

Why comparisons are fair: every run uses the same arrival schedule (loadgen seed), the same
images in the same order, and the same straggler samples (slowdown seed; worker i draws from
seed + i in every mode, and a fresh cluster per run restarts each worker's sequence). Warm-up
requests are sent on the schedule but excluded. With ``repeats`` each run is repeated on a
fresh cluster and the median of each statistic is reported beside its spread.

Before each run the harness waits (``quiet_wait`` seconds at most) until other work holds at most
a quarter of the CPUs, records the share other work took during the run, and runs again once a
run above a quarter (``retry_busy``), keeping the quieter attempt.
"""

from __future__ import annotations

import re
import statistics
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from collage_inference.bench.loadgen import LoadConfig, LoadResult, run_load_sync
from collage_inference.bench.machine import BUSY_SHARE, cpu_account, cpu_busy, others_share
from collage_inference.bench.scenarios import LoadPoint, Scenario
from collage_inference.config import load_config
from collage_inference.data import load_dataset
from collage_inference.deploy.local import open_cluster
from collage_inference.modes import MODES
from collage_inference.serving.metrics import parse_metrics

if TYPE_CHECKING:
    from collage_inference.bench.compare import BenchConfig

BASELINES = ("equal", "replicate", "hedge")  # the modes that cost 1/k, like collage


@dataclass(frozen=True)
class RunSpec:
    """One cluster + one load run."""

    mode: str
    grid: int
    point: LoadPoint
    stragglers: bool = True
    replicate_timeout: float | None = None
    reissue_to: str = "idle"
    policy: str | None = None  # the decoder policy; None: the serving default
    parity_k: int | None = None  # mode parm: requests per parity query

    @property
    def label(self) -> str:
        label = self.mode if self.grid == 3 or "collage" not in self.mode else f"{self.mode} S={self.grid}"
        if self.parity_k is not None:
            label = f"parm k={self.parity_k}"
        if self.replicate_timeout is not None:
            label += f" @{self.replicate_timeout * 1e3:.0f}ms"
        if self.reissue_to != "idle":
            label += f" ({self.reissue_to})"
        if self.policy is not None:
            label += f" ({self.policy})"
        return label + ("" if self.stragglers else " (no stragglers)")


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
    record = {
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
    if result.burst_summary is not None:
        b = result.burst_summary
        record["burst"] = {"p50_ms": b.p50_ms, "p99_ms": b.p99_ms, "std_ms": b.std_ms, "count": b.count,
                           "failed": result.bursts_failed}  # fmt: skip
    return record


COUNTERS = ("reissued_per_request", "mean_group_size", "group_deadline_ms", "straggler_window_ms",
            "collages_skipped", "groups_2plus_unanswered")  # fmt: skip


def front_end_counters(url: str, sent: int) -> dict[str, float | None]:
    """From the front end's ``/metrics`` (warm-up included): re-issued s-CNN calls per request,
    the mean requests per collage group, the last group deadline and straggler window, and the
    collages not sent (None when not exposed)."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as reply:
            found = parse_metrics(reply.read().decode())
    except (OSError, ValueError):
        return dict.fromkeys(COUNTERS)

    def one(name: str) -> float | None:
        return next((v for (n, _), v in found.items() if n == name), None)

    sizes = [
        (int(re.search(r'size="(\d+)"', labels)[1]), n)
        for (name, labels), n in found.items()
        if name == "collage_group_size_total"
    ]
    groups = sum(n for _, n in sizes)
    backed = {
        re.search(r'unanswered="([^"]+)"', labels)[1]: n
        for (name, labels), n in found.items()
        if name == "collage_backup_stragglers_total"
    }
    answered_groups = sum(backed.values())
    reissues, deadline = one("collage_reissues_total"), one("collage_group_deadline_seconds")
    window = one("collage_straggler_window_seconds")
    return {
        "reissued_per_request": round(reissues / max(sent, 1), 4) if reissues is not None else None,
        "mean_group_size": round(sum(s * n for s, n in sizes) / groups, 3) if groups else None,
        "group_deadline_ms": round(deadline * 1e3, 1) if groups and deadline is not None else None,
        "straggler_window_ms": round(window * 1e3, 1) if groups and window else None,
        "collages_skipped": one("collage_collages_skipped_total") if groups else None,
        # ParM's blind spot: groups whose backup found two or more requests still unanswered
        "groups_2plus_unanswered": round(backed["2+"] / answered_groups, 4) if answered_groups else None,
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


def _log_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def serve_overrides(cfg: BenchConfig, sc: Scenario, spec: RunSpec) -> dict[str, Any]:
    """The ServeConfig keys of one run: fresh ports, no restarts (a crash must show as errors)."""
    overrides: dict[str, Any] = {
        "mode": spec.mode,
        "grid": spec.grid,
        "port": 0,
        "restart": False,
        "models_dir": cfg.models_dir,
        "request_timeout": cfg.request_timeout,
        "reissue_to": spec.reissue_to,
        "backend": cfg.backend,
    }
    if spec.grid != cfg.grid or spec.parity_k is not None:  # the same k s-CNN workers, whatever the code
        overrides["scnn_workers"] = MODES[spec.mode].scnn_workers(cfg.k)
    if spec.parity_k is not None:
        overrides |= {"parity_k": spec.parity_k, "parity_encoder": cfg.parity_encoder}
    if spec.replicate_timeout is not None:
        overrides["replicate_timeout"] = spec.replicate_timeout
    if spec.policy is not None:
        overrides["policy"] = spec.policy
    if spec.stragglers:
        overrides |= {
            "slowdown.spec": sc.spec,
            "slowdown.kind": sc.kind,
            "slowdown.seed": cfg.seed,
            "slowdown.onset_rate": sc.onset_rate,
            "slowdown.period": sc.period,
            "slowdown.collage": cfg.straggle_collage,
        }
    return overrides


@dataclass
class Harness:
    """Runs the settings of one bench config against fresh clusters, with progress on stderr."""

    config: BenchConfig
    scenario: Scenario
    images: Images
    log: Callable[[str], None] = field(default=_log_stderr)
    started: float = field(default_factory=time.monotonic)
    done: int = 0

    def serve_overrides(self, spec: RunSpec) -> dict[str, Any]:
        return serve_overrides(self.config, self.scenario, spec)

    def measure(self, spec: RunSpec) -> dict[str, Any]:
        """Start the cluster of ``spec``, run the load ``repeats`` times, stop it; the median run."""
        cfg = self.config
        load = LoadConfig(
            "http://127.0.0.1:1",  # replaced with the cluster's URL below
            spec.point.rate,
            cfg.requests,
            arrival=spec.point.pattern,
            burst_size=cfg.burst,
            seed=cfg.seed,
            warmup=cfg.warmup,
            timeout_s=cfg.request_timeout + 5.0,
        )
        runs = []
        for _ in range(cfg.repeats):
            attempts: list[dict[str, Any]] = []
            for _ in range(cfg.retry_busy + 1):
                self.wait_for_quiet()
                t0, cpu0 = time.monotonic(), cpu_account()
                with open_cluster(load_config(overrides=self.serve_overrides(spec))) as cluster:
                    result = run_load_sync(
                        replace(load, url=cluster.url), self.images.images, self.images.labels
                    )
                    # workers beyond the k of mode none (another S keeps the same k workers)
                    own_pool = spec.grid == cfg.grid and spec.parity_k is None
                    cost = cluster.extra_cost if own_pool else MODES[spec.mode].extra_cost(cfg.k)
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
        out = {**median_run(runs), "mode": spec.mode, "grid": spec.grid, "reissue_to": spec.reissue_to}
        errors = sum(out["errors"].values())
        self.log(
            f"[{spec.point.label}, {spec.point.rate:g} req/s] {spec.label:<32} p50 {out['p50_ms']:7.1f}  "
            f"p99 {out['p99_ms']:7.1f}  std {out['std_ms']:6.1f} ms  acc {out['accuracy'] or 0:.4f}  "
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

    def reference(self, point: LoadPoint) -> dict[str, Any]:
        """Mode none without stragglers: the s-CNN's own accuracy on the very images every run
        sends, and the serving path's own latency."""
        return self.measure(RunSpec("none", self.config.grid, point, stragglers=False))

    def point(self, point: LoadPoint) -> dict[str, Any]:
        """Every mode at one load point (see the module docstring for the order and why)."""
        cfg, grid = self.config, self.config.grid
        modes: dict[str, dict[str, Any]] = {"none": self.measure(RunSpec("none", grid, point))}
        for mode in cfg.modes:
            if mode == "replicate":
                modes[mode] = self.replicate_sweep(point, modes["none"]["p50_ms"])
            elif mode == "hedge":
                runs = [
                    self.measure(RunSpec("hedge", grid, point, reissue_to=t)) for t in cfg.reissue_targets
                ]
                best = min(runs, key=lambda r: r["p99_ms"])
                modes[mode] = {**best, "variants": [_brief(r) for r in runs]}
            elif mode == "parm":
                for k in cfg.parity_ks:
                    modes[f"parm k={k}"] = self.measure(RunSpec("parm", grid, point, parity_k=k))
            elif mode != "none":
                modes[mode] = self.measure(RunSpec(mode, grid, point))
        if "collage" in cfg.modes:
            for policy in cfg.collage_policies:
                modes[f"collage ({policy})"] = self.measure(RunSpec("collage", grid, point, policy=policy))
            for extra in cfg.extra_grids:
                modes[f"collage S={extra}"] = self.measure(RunSpec("collage", extra, point))
        return {"pattern": point.pattern, "load": point.load, "rate_rps": point.rate, "modes": modes}

    def replicate_sweep(self, point: LoadPoint, fast_ms: float) -> dict[str, Any]:
        """Mode replicate at each timeout multiple of the fast-mode latency and re-issue target;
        the lowest p99 wins."""
        points: list[tuple[float, str, dict[str, Any]]] = []

        def measure(multiple: float, target: str) -> bool:
            timeout = max(round(multiple * fast_ms) / 1e3, 0.001)
            if any(t == timeout and to == target for t, to, _ in points):
                return False  # rounds to a setting already measured
            run = self.measure(RunSpec("replicate", self.config.grid, point, replicate_timeout=timeout,
                                       reissue_to=target))  # fmt: skip
            points.append((timeout, target, {**run, "multiple": multiple}))
            return True

        for target in self.config.reissue_targets:
            for multiple in self.config.sweep:
                measure(multiple, target)
        # Bracket the minimum: a best point at an end of the sweep may not be the best timeout.
        for _ in range(self.config.bracket):
            timeout, target, best = min(points, key=lambda p: p[2]["p99_ms"])
            same = sorted(p[0] for p in points if p[1] == target)
            if len(same) < 2 or same[0] < timeout < same[-1]:
                break
            step = 0.6 if timeout == same[0] else 1.6
            if not measure(best["multiple"] * step, target) or timeout * step < 0.002:
                break
        timeout, target, best = min(points, key=lambda p: p[2]["p99_ms"])
        ordered = sorted(points, key=lambda p: (p[1], p[0]))
        sweep = [{"timeout_ms": t * 1e3, **_brief(r)} for t, _, r in ordered]
        return {**best, "replicate_timeout_ms": timeout * 1e3, "sweep": sweep}


def _brief(run: dict[str, Any]) -> dict[str, Any]:
    keys = ("p50_ms", "p99_ms", "std_ms", "reissued_per_request", "reissue_to")
    return {k: run.get(k) for k in keys}
