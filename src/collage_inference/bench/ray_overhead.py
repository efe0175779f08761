"""`collage bench-ray`: what the Ray Serve backend adds to a request, measured side by side.

Three targets, one run, the same open-loop load generator, rate and images, no stragglers:

1. ``local``: the collage front end on the local backend (mode collage, S = 2: 4 s-CNN worker
   processes and 1 collage worker behind the front end's own HTTP server);
2. ``ray``: the very same front end on Ray Serve (4 s-CNN replicas, 1 collage replica, the
   front end as the ingress), on a private Ray instance of this machine's cores. Same fan-out:
   each request makes one s-CNN call, each group of S*S one collage call;
3. ``plain ray``: Ray Serve's own floor, an ingress that parses the same V2 request, awaits
   four trivial deployment calls (an echo) and renders a V2 answer.

Reported: p50 and p99 of each, the latency the Ray backend adds (``ray - local``), and two
ratios with their targets: the collage front end on Ray adds no more than plain Ray Serve
takes (``added / plain <= 1``), and the local backend is at least 5x faster than plain Ray
Serve (``plain / local >= 5``). The local backend runs first, before Ray starts, so Ray's idle
background processes do not slow it; the two Ray targets run interleaved on one instance.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from collage_inference.bench.loadgen import LoadConfig, LoadResult, environment, run_load_sync, warmup_for
from collage_inference.config import Limits, RaySettings, ServeConfig
from collage_inference.data import load_dataset
from collage_inference.deploy.local import LocalCluster
from collage_inference.errors import CollageError
from collage_inference.serving.v2 import (
    HEADER_LENGTH,
    InferResponse,
    InferTensor,
    parse_infer_request,
    render_infer_response,
)

GRID = 2  # k = 4: the fan-out fits 2 cores with room for the load generator
CALLS = 4  # the plain ingress's trivial deployment calls per request


class Echo:
    """A trivial deployment: returns its input."""

    async def __call__(self, images: np.ndarray) -> np.ndarray:
        return images


class PlainIngress:
    """Ray Serve without collage inference: parse V2, await four echo calls, render V2."""

    def __init__(self, echo: Any) -> None:
        self.echo = echo

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import Response

        parsed = parse_infer_request(await request.body(), request.headers.get(HEADER_LENGTH), Limits())
        image = parsed.inputs[0].data
        await asyncio.gather(*(self.echo.remote(image) for _ in range(CALLS)))
        label = InferTensor.of("label", np.array([0], np.int64))
        payload, headers = render_infer_response(InferResponse("classifier", (label,), parsed.id), parsed)
        return Response(payload, 200, headers)


def serve_config(cpus: int) -> ServeConfig:
    """Both backends: mode collage, S = 2, no stragglers; Ray replicas share the cores."""
    share = round(cpus / 10, 3)  # 4 s-CNN + 1 collage + ingress, and the plain app's 3: within cpus
    ray = RaySettings(
        num_cpus=cpus, object_store_mb=200, scnn_replicas=GRID * GRID,
        scnn_cpus=share, collage_cpus=share, ingress_cpus=share,
    )  # fmt: skip
    return ServeConfig(mode="collage", grid=GRID, port=0, restart=False, ray=ray)


Log = Callable[[str], None]


def _load(
    name: str, url: str, rate: float, requests: int, seed: int,
    images: np.ndarray, labels: np.ndarray, log: Log,
) -> LoadResult:  # fmt: skip
    config = LoadConfig(url, rate, requests, seed=seed, warmup=warmup_for(requests))
    result = run_load_sync(config, images, labels)
    log(f"{name:<10} run {seed + 1}: p50 {result.summary.p50_ms:.2f} ms, p99 {result.summary.p99_ms:.2f} ms")
    return result


def _summary(results: list[LoadResult]) -> dict[str, float]:
    return {
        "p50_ms": statistics.median(r.summary.p50_ms for r in results),
        "p99_ms": statistics.median(r.summary.p99_ms for r in results),
        "errors": sum(r.summary.error_count for r in results),
        "throughput_rps": statistics.median(r.summary.throughput_rps for r in results),
    }


def measure(
    rate: float, requests: int, repeats: int, images: np.ndarray, labels: np.ndarray, log: Log = print
) -> dict[str, Any]:
    """The three targets (see the module docstring); medians over ``repeats`` runs each."""
    from ray import serve

    from collage_inference.deploy.ray import RayCluster

    config = serve_config(os.cpu_count() or 2)
    local: list[LoadResult] = []
    with LocalCluster(config) as cluster:
        for i in range(repeats):
            local.append(_load("local", cluster.url, rate, requests, i, images, labels, log))
    ray_runs: list[LoadResult] = []
    plain: list[LoadResult] = []
    share = config.ray.scnn_cpus
    with RayCluster(replace(config, backend="ray")) as cluster:
        echo = serve.deployment(Echo).options(
            name="echo", num_replicas=2, ray_actor_options={"num_cpus": share}
        )
        ingress = serve.deployment(PlainIngress).options(
            name="plain", ray_actor_options={"num_cpus": share}, max_ongoing_requests=1000
        )
        serve.run(ingress.bind(echo.bind()), name="plain", route_prefix="/plain")
        for i in range(repeats):
            ray_runs.append(_load("ray", cluster.url, rate, requests, i, images, labels, log))
            plain.append(_load("plain ray", f"{cluster.url}/plain", rate, requests, i, images, labels, log))
    out = {"local": _summary(local), "ray": _summary(ray_runs), "plain_ray": _summary(plain)}
    for q in ("p50_ms", "p99_ms"):
        added = out["ray"][q] - out["local"][q]
        out[f"added_{q}"] = added
        out[f"added_over_plain_{q[:3]}"] = added / out["plain_ray"][q]
        out[f"plain_over_local_{q[:3]}"] = out["plain_ray"][q] / out["local"][q]
    out["accuracy"] = {"local": statistics.median(r.accuracy for r in local),
                       "ray": statistics.median(r.accuracy for r in ray_runs)}  # fmt: skip
    return out


def table(out: dict[str, Any]) -> str:
    rows = [
        "| target | p50 ms | p99 ms | errors |",
        "|---|---|---|---|",
        *(
            f"| {name} | {out[key]['p50_ms']:.2f} | {out[key]['p99_ms']:.2f} | {out[key]['errors']} |"
            for name, key in (
                ("local backend (collage, S=2)", "local"),
                ("Ray backend (collage, S=2)", "ray"),
                (f"plain Ray Serve ({CALLS} trivial calls)", "plain_ray"),
            )
        ),
        f"| added by the Ray backend (ray - local) | {out['added_p50_ms']:+.2f} "
        f"| {out['added_p99_ms']:+.2f} | |",
        "",
        "| figure | p50 | p99 | target | met |",
        "|---|---|---|---|---|",
    ]
    for name, key, target, ok in (
        ("added / plain Ray", "added_over_plain", "<= 1", lambda v: v <= 1.0),
        ("plain Ray / local", "plain_over_local", ">= 5", lambda v: v >= 5.0),
    ):
        p50, p99 = out[f"{key}_p50"], out[f"{key}_p99"]
        met = "yes" if ok(p50) and ok(p99) else "NO"
        rows.append(f"| {name} | {p50:.2f}x | {p99:.2f}x | {target} | {met} |")
    return "\n".join(rows)


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="collage bench-ray", description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=20.0, help="open-loop requests per second")
    p.add_argument("--requests", type=int, default=600, help="measured requests per run")
    p.add_argument("--repeats", type=int, default=1, help="runs per target; medians are reported")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout instead of tables")
    args = p.parse_args(argv)
    try:
        from collage_inference.deploy.ray import require_ray

        require_ray()
        test = load_dataset("fashion-mnist", "test")
        out = measure(args.rate, args.requests, args.repeats, test.images, test.labels, _log)
    except CollageError as exc:
        print(f"collage bench-ray: error: {exc}", file=sys.stderr)
        return 2
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "collage bench-ray " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": environment(),
        "rate_rps": args.rate,
        "requests_per_run": args.requests,
        "repeats": args.repeats,
        **out,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(table(out))
        env = report["environment"]
        print(f"\n{report['date']}, {env['cpus']} CPUs, {env['platform']}; {args.rate:g} req/s, "
              f"{args.requests} requests per run, {args.repeats} run(s) per target")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
