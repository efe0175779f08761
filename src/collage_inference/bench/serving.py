"""`collage bench-serving`: the serving figures, printed with the machine they ran on.

1. Front-end overhead: the same s-CNN worker (no injected delay) called directly and through
   the front end (mode ``none``, that worker alone), at the same open-loop rate, in short
   direct / front-end pairs. The order alternates from pair to pair (AB BA AB ...), so a drift
   in the speed of a shared machine hits both sides alike; the overhead is the median of the
   pairs' own differences, at p50 and at p99. With ``--v2-server URL#MODEL@FILE.onnx`` the same
   pairs are measured again in front of that server (a Triton, KServe or MLServer serving the
   exported s-CNN in its own tensors), and both overheads are reported side by side. There the
   direct side sends the FP32 tensors ready-made, rendered before the clock starts, while the
   front end resizes and scales each image itself: that work is part of its overhead.
2. The live page: the front end's p50 (and p99) at the same rate without and with
   ``/dashboard`` open, in alternating pairs, and how soon a headless Chromium shows it
   (:mod:`collage_inference.bench.dashboard`).
3. Sustained rate: mode ``collage`` with S = 3 (9 s-CNN workers, 1 collage worker) at a high
   open-loop rate; "no growing queues" means no errors, the offered rate achieved, and the last
   fifth of the run no slower at p50 than the first fifth (ratio reported).

Warm-up requests are excluded from every figure. Targets: overhead p50 <= 1 ms and p99 <= 3 ms
at 200 requests/s; the page open changes p50 by at most 0.1 ms and is usable within 2 s;
>= 500 requests/s sustained in collage mode.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
from dataclasses import dataclass

import numpy as np

from collage_inference.bench.dashboard import dashboard_cost
from collage_inference.bench.loadgen import LoadConfig, LoadResult, environment, run_load_sync, warmup_for
from collage_inference.bench.payload import TensorInput
from collage_inference.config import WorkerEndpoint, load_config
from collage_inference.data import load_dataset
from collage_inference.deploy.local import LocalCluster
from collage_inference.errors import ConfigError


@dataclass(frozen=True)
class Figure:
    name: str
    value: float
    target: str
    met: bool

    def __post_init__(self) -> None:  # NumPy scalars in, plain JSON-able values out
        object.__setattr__(self, "value", float(self.value))
        object.__setattr__(self, "met", bool(self.met))


@dataclass(frozen=True)
class Target:
    """Where one side of an overhead pair sends its requests."""

    url: str
    model: str
    tensor: TensorInput | None = None  # the server runs the exported file in its own tensors


def _load(target: Target, rate: float, requests: int, seed: int, images, labels) -> LoadResult:
    config = LoadConfig(
        target.url, rate, requests, model=target.model, seed=seed, warmup=warmup_for(requests),
        target="tensor" if target.tensor else "v2", tensor=target.tensor,
    )  # fmt: skip
    return run_load_sync(config, images, labels)


def overhead(
    rate: float, requests: int, repeats: int, images, labels, server: WorkerEndpoint | None = None
) -> dict:
    """p50/p99 of direct calls to one s-CNN server vs calls through the front end (mode ``none``,
    that server alone), in ``repeats`` pairs. ``server``: a V2 server already running elsewhere
    (Triton, KServe, MLServer); None: a worker of our own, started here."""
    overrides: dict = {"mode": "none", "grid": 2, "scnn_workers": 1, "port": 0}
    if server is not None:
        overrides["scnn"] = [server]
    direct, fronted, inside, call = [], [], [], []
    with LocalCluster(load_config(overrides=overrides)) as cluster:
        if server is None:
            direct_target = Target(cluster.worker_urls[0], "scnn")
        else:
            tensor = TensorInput.of_file(server.model_file) if server.model_file else None
            direct_target = Target(server.url, server.model, tensor)
        targets = {"direct": direct_target, "fronted": Target(cluster.url, "classifier")}
        for i in range(repeats):
            order = ["direct", "fronted"] if i % 2 == 0 else ["fronted", "direct"]
            runs = {side: _load(targets[side], rate, requests, i, images, labels) for side in order}
            direct.append(runs["direct"].summary)
            fronted.append(runs["fronted"].summary)
            accuracy = runs["fronted"].accuracy
            # What the front end reports of each answer: admission to answer, and its call in that.
            timed = [r.timings for r in runs["fronted"].records if "round_trip_ms" in r.timings]
            inside += [t["latency_ms"] - t["round_trip_ms"] for t in timed if "latency_ms" in t]
            call += [t["round_trip_ms"] for t in timed]

    def med(runs, key):
        return statistics.median(getattr(s, key) for s in runs)

    pairs_p50 = [f.p50_ms - d.p50_ms for d, f in zip(direct, fronted, strict=True)]
    pairs_p99 = [f.p99_ms - d.p99_ms for d, f in zip(direct, fronted, strict=True)]
    return {
        "server": "own worker" if server is None else server.arg,
        "rate_rps": rate,
        "requests_per_run": requests,
        "repeats": repeats,
        "direct_p50_ms": med(direct, "p50_ms"),
        "direct_p99_ms": med(direct, "p99_ms"),
        "frontend_p50_ms": med(fronted, "p50_ms"),
        "frontend_p99_ms": med(fronted, "p99_ms"),
        # Each pair's own difference, then their median: robust to the drift between pairs.
        "overhead_p50_ms": statistics.median(pairs_p50),
        "overhead_p99_ms": statistics.median(pairs_p99),
        "pair_overheads_p50_ms": pairs_p50,
        "pair_overheads_p99_ms": pairs_p99,
        # Where the front end's side goes: inside it (admission to answer, less its call), its
        # call to the server, and the rest: the second hop's HTTP and the processes' contention.
        "inside_frontend_p50_ms": float(np.median(inside)) if inside else math.nan,
        "frontend_call_p50_ms": float(np.median(call)) if call else math.nan,
        "frontend_accuracy": accuracy,  # of the last run through the front end
        "errors": sum(s.error_count for s in direct + fronted),
    }


def sustained(rate: float, requests: int, images, labels) -> dict:
    """Collage mode, S = 3, at ``rate``: achieved throughput and queue growth."""
    config = load_config(overrides={"mode": "collage", "grid": 3, "port": 0})
    with LocalCluster(config) as cluster:
        result = _load(Target(cluster.url, "classifier"), rate, requests, 7, images, labels)
    lat = np.asarray(result.latencies_ms)
    fifth = max(len(lat) // 5, 1)
    first, last = float(np.median(lat[:fifth])), float(np.median(lat[-fifth:]))
    return {
        "offered_rps": rate,
        "requests": requests,
        "achieved_rps": result.summary.throughput_rps,
        "p50_ms": result.summary.p50_ms,
        "p99_ms": result.summary.p99_ms,
        "errors": result.summary.error_count,
        "accuracy": result.accuracy,
        "sources": dict(result.source_shares),
        "first_fifth_p50_ms": first,
        "last_fifth_p50_ms": last,
        "queue_growth": last / first if first > 0 else float("inf"),
    }


def figures(overheads: list[dict], sus: dict, page: dict | None = None) -> list[Figure]:
    own, *foreign = overheads
    rows = [
        Figure("front-end overhead p50 (ms)", own["overhead_p50_ms"], "<= 1", own["overhead_p50_ms"] <= 1.0),
        Figure("front-end overhead p99 (ms)", own["overhead_p99_ms"], "<= 3", own["overhead_p99_ms"] <= 3.0),
    ]
    for over in foreign:  # reported beside the own worker's; the targets are for our own stack
        rows += [
            Figure(f"front-end overhead {q} in front of {over['server']} (ms)", over[f"overhead_{q}_ms"],
                   "reported, no errors", over["errors"] == 0)
            for q in ("p50", "p99")
        ]  # fmt: skip
    if page is not None:
        ready, clean = page["chromium_ready_s"], page["errors"] + page["page_errors"] == 0
        rows += [
            Figure("p50 change with the dashboard open, collage S=2 (ms)", page["change_p50_ms"],
                   "<= 0.1, no errors", page["change_p50_ms"] <= 0.1 and clean),
            Figure("dashboard shows its figures in headless Chromium, browser start included (s)",
                   math.nan if ready is None else ready, "<= 2", ready is not None and ready <= 2.0),
        ]  # fmt: skip
    return [
        *rows,
        Figure(
            "sustained rate, collage S=3 (req/s)",
            sus["achieved_rps"],
            f">= 500 at {sus['offered_rps']:g} offered, no errors, no queue growth",
            sus["achieved_rps"] >= 0.97 * sus["offered_rps"]
            and sus["errors"] == 0
            and sus["queue_growth"] < 1.5,
        ),
    ]


def _endpoint(arg: str) -> WorkerEndpoint:
    """``URL#MODEL@FILE.onnx`` as the front end reads it from ``--scnn``."""
    return load_config(overrides={"mode": "none", "grid": 2, "scnn": [arg]}).scnn[0]


def _print_overhead(over: dict) -> None:
    print(f"s-CNN server    {over['server']}, {over['rate_rps']:g} req/s, {over['repeats']} pairs")
    print(f"  direct        p50 {over['direct_p50_ms']:.2f} ms  p99 {over['direct_p99_ms']:.2f} ms")
    print(f"  via front end p50 {over['frontend_p50_ms']:.2f} ms  p99 {over['frontend_p99_ms']:.2f} ms")
    pairs = zip(over["pair_overheads_p50_ms"], over["pair_overheads_p99_ms"], strict=True)
    print("  pairs p50/p99 " + ", ".join(f"{a:+.2f} / {b:+.2f}" for a, b in pairs) + " ms")
    print(
        f"  overhead      p50 {over['overhead_p50_ms']:+.2f} ms, p99 {over['overhead_p99_ms']:+.2f} ms "
        f"(median of the pairs), errors {over['errors']}, accuracy {over['frontend_accuracy']:.4f}"
    )
    print(
        f"  in the front end: p50 {over['inside_frontend_p50_ms']:.2f} ms admission to answer less its "
        f"call, call p50 {over['frontend_call_p50_ms']:.2f} ms"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="collage bench-serving", description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=200.0, help="open-loop rate of the overhead runs")
    p.add_argument("--requests", type=int, default=800, help="measured requests per overhead run")
    p.add_argument("--repeats", type=int, default=8, help="direct / front-end pairs of overhead runs")
    p.add_argument(
        "--v2-server", metavar="URL#MODEL@FILE.onnx",
        help="also measure the overhead in front of this running V2 server (Triton, KServe, MLServer) "
             "serving the exported s-CNN FILE.onnx in its own tensors, beside the own worker's",
    )  # fmt: skip
    p.add_argument("--no-dashboard", dest="dashboard", action="store_false",
                   help="skip the runs with and without the live page open")  # fmt: skip
    p.add_argument("--sustained-rate", type=float, default=500.0)
    p.add_argument("--sustained-requests", type=int, default=5000)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = p.parse_args(argv)
    try:
        server = _endpoint(args.v2_server) if args.v2_server else None
    except ConfigError as exc:
        p.error(f"--v2-server: {exc}")
    test = load_dataset("fashion-mnist", "test")
    images, labels = test.images, test.labels
    overheads = []
    for where in [None, server] if server else [None]:
        print(f"measuring front-end overhead ({where.arg if where else 'own worker'}) ...",
              file=sys.stderr, flush=True)  # fmt: skip
        overheads.append(overhead(args.rate, args.requests, args.repeats, images, labels, where))
    page = None
    if args.dashboard:
        print("measuring the live page's cost ...", file=sys.stderr, flush=True)
        page = dashboard_cost(args.rate, args.requests, args.repeats, images, labels)
    print("measuring sustained rate ...", file=sys.stderr, flush=True)
    sus = sustained(args.sustained_rate, args.sustained_requests, images, labels)
    figs = figures(overheads, sus, page)
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "collage bench-serving " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": environment(),
        "overhead": overheads[0],
        **({"overhead_v2_server": overheads[1]} if server else {}),
        **({"dashboard": page} if page else {}),
        "sustained": sus,
        "figures": [f.__dict__ for f in figs],
    }
    if args.json:
        print(json.dumps(report, indent=2, default=float))
    else:
        print(f"{report['date']}  {report['environment']}")
        for over in overheads:
            _print_overhead(over)
        if page:
            pairs = ", ".join(f"{d:+.3f}" for d in page["pair_changes_p50_ms"])
            print(f"live page       collage S=2, {page['rate_rps']:g} req/s, {page['repeats']} pairs: p50 "
                  f"{page['closed_p50_ms']:.3f} ms closed, {page['open_p50_ms']:.3f} ms open; change p50 "
                  f"{page['change_p50_ms']:+.3f} ms (pairs {pairs}), p99 {page['change_p99_ms']:+.3f} ms; "
                  f"{page['page_requests']} page requests, {page['page_errors']} failed; headless Chromium "
                  f"showed it in {page['chromium_ready_s'] or math.nan:.2f} s")  # fmt: skip
        print(
            f"sustained       {sus['achieved_rps']:.0f} req/s of {sus['offered_rps']:g} offered, "
            f"p50 {sus['p50_ms']:.2f} ms, p99 {sus['p99_ms']:.2f} ms, errors {sus['errors']}, "
            f"p50 last/first fifth {sus['queue_growth']:.2f}, accuracy {sus['accuracy']:.4f}"
        )
        print("| figure | value | target | met |\n|---|---|---|---|")
        for f in figs:
            print(f"| {f.name} | {f.value:.2f} | {f.target} | {'yes' if f.met else 'NO'} |")
    return 0 if all(f.met for f in figs) else 1


if __name__ == "__main__":
    sys.exit(main())
