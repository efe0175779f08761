"""An open-loop load generator for KServe V2 (and ``/predict``) image classifiers.

    collage loadgen --url http://127.0.0.1:8000 --rate 200 --requests 5000 --model scnn

Open loop, because closed loops lie about tails. A closed-loop client sends its next request
only after the last answer, so a stalled server also stalls the client: the requests that would
have arrived during the stall are never sent and never measured ("coordinated omission"). Here
every arrival time is fixed before the run from a seed, Poisson (exponential gaps) or constant
rate, and each request's latency is measured from its *scheduled* time, not from when it was
actually sent. Three arrival patterns, each at ``rate`` requests per second on average:
``poisson`` (exponential gaps), ``constant`` (even gaps) and ``burst``: ``burst_size`` requests at
the same instant, the bursts a Poisson process of ``rate / burst_size`` per second (the setting of
the published collage experiments, where a master sent k requests at once). For bursts the
result also holds each burst's latency: from its scheduled time until its last request was
answered, as the authors measured. A stall therefore shows up in every request scheduled during
it, and so does any lag of this generator itself (reported as ``send_lag``, so an overloaded
client is visible rather than silently flattering the server).

The request path is: schedule -> admit (in-flight cap) -> send -> read -> parse -> record.
Each request carries a real test image (cycled through the given array), so accuracy and the
share of answers per ``source`` (primary, collage, replica) are measured on the same run as the
latency. Warm-up requests are sent on the same schedule, ahead of the measured ones, and are
excluded from every statistic. Everything is bounded: a fixed request count, a per-request
timeout, an overall timeout, and a cap on requests in flight. A request that would exceed the
cap is not queued (queueing would be a closed loop in disguise) but counted as an ``overflow``
error.

Failures are counted by cause in ``summary.errors``: an HTTP status (``"503"``), ``"timeout"``
(per-request timeout), ``"connection"``, ``"bad-response"`` (a 200 that does not parse or has
no single label), ``"overflow"``, ``"cancelled"`` (in flight when the overall timeout ended the
run) and ``"unsent"`` (scheduled after the overall timeout).

What is sent and read (the ``v2``, ``tensor`` and ``predict`` targets) is in :mod:`.payload`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import httptools
import numpy as np
from multidict import CIMultiDict

from collage_inference.bench.payload import TensorInput, as_hwc, parse_answer, render_payload
from collage_inference.bench.stats import Histogram, LatencySummary
from collage_inference.data import DATASET_KINDS, load_dataset
from collage_inference.errors import CollageError, ConfigError, ProtocolError
from collage_inference.serving.web.client import HttpClient
from collage_inference.serving.web.routes import load_token, run

ARRIVALS = ("poisson", "constant", "burst")
TARGETS = ("v2", "tensor", "predict")
UNREPORTED = "unreported"  # the server named no source (a bare worker, an external V2 server)
_START_LEAD_S = 0.05  # the first arrival is this far after setup, so it is not late by construction


@dataclass(frozen=True)
class LoadConfig:
    """One load run. ``requests`` are measured; ``warmup`` more are sent first and not measured."""

    url: str
    rate: float
    requests: int
    model: str = "classifier"  # the front end's default; a bare worker serves its model's own name
    arrival: str = "poisson"
    burst_size: int = 9  # requests per burst (arrival "burst" only)
    seed: int = 0
    warmup: int = 0
    target: str = "v2"  # "v2" / "tensor": POST {url}/v2/models/{model}/infer; "predict": {url}/predict
    tensor: TensorInput | None = None  # the model's own input (target "tensor" only)
    binary: bool = True  # V2 binary tensor extension; False sends and asks for JSON
    timeout_s: float = 10.0  # per request, from when it is sent
    overall_timeout_s: float | None = None  # None: the schedule's span + timeout_s + 5 s
    max_in_flight: int = 256
    token: str | None = field(default=None, repr=False)  # bearer token of a protected server

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"--url must start with http:// or https://, got {self.url!r}")
        if not (math.isfinite(self.rate) and self.rate > 0):
            raise ConfigError(f"--rate must be a positive number of requests per second, got {self.rate}")
        if self.requests < 1 or self.warmup < 0:
            raise ConfigError("--requests must be at least 1 and --warmup at least 0")
        if self.arrival not in ARRIVALS:
            raise ConfigError(
                f"unknown arrival process {self.arrival!r}; choose one of {', '.join(ARRIVALS)}"
            )
        if self.target not in TARGETS:
            raise ConfigError(f"unknown target {self.target!r}; choose one of {', '.join(TARGETS)}")
        if (self.target == "tensor") != (self.tensor is not None):
            raise ConfigError("the tensor target needs the model's input: give --model-file PATH.onnx")
        if not self.timeout_s > 0 or (self.overall_timeout_s is not None and not self.overall_timeout_s > 0):
            raise ConfigError("timeouts must be positive seconds")
        if self.burst_size < 1:
            raise ConfigError(f"--burst-size must be at least 1, got {self.burst_size}")
        if self.max_in_flight < 1:
            raise ConfigError(f"--max-in-flight must be at least 1, got {self.max_in_flight}")
        if not self.model or "/" in self.model:
            raise ConfigError(f"--model must be a non-empty name without '/', got {self.model!r}")

    @property
    def endpoint(self) -> str:
        base = self.url.rstrip("/")
        return f"{base}/predict" if self.target == "predict" else f"{base}/v2/models/{self.model}/infer"


def arrival_offsets(
    n: int, rate: float, arrival: str = "poisson", seed: int = 0, burst_size: int = 9
) -> np.ndarray:
    """Send times in seconds from the start of the run, (n,), the first at 0. The same seed gives
    the same schedule, so two servers can be compared under the identical arrival sequence.
    ``burst``: groups of ``burst_size`` equal times, the bursts Poisson at ``rate / burst_size``."""
    if arrival == "constant":
        return np.arange(n, dtype=np.float64) / rate
    if arrival == "poisson":
        gaps = np.random.default_rng(seed).exponential(1.0 / rate, n)
        return np.concatenate([[0.0], np.cumsum(gaps[:-1])])[:n]
    if arrival == "burst":
        bursts = -(-n // burst_size)
        gaps = np.random.default_rng(seed).exponential(burst_size / rate, bursts)
        starts = np.concatenate([[0.0], np.cumsum(gaps[:-1])])
        return np.repeat(starts, burst_size)[:n]
    raise ConfigError(f"unknown arrival process {arrival!r}; choose one of {', '.join(ARRIVALS)}")


@dataclass(frozen=True)
class RequestRecord:
    """What happened to one scheduled request. Times are seconds from the run's start;
    ``latency_s`` runs from the *scheduled* time to the end of the response body."""

    index: int
    image_index: int
    warmup: bool
    scheduled_s: float
    status: str  # "ok", an HTTP status code, or a client-side cause (see the module docstring)
    sent_s: float | None = None
    latency_s: float | None = None
    label: int | None = None
    correct: bool | None = None
    source: str | None = None
    timings: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class LoadResult:
    """The measured part of a run. ``requests = sent + overflowed + unsent`` and
    ``sent = answered + failed``; ``latencies_ms`` holds the answered ones in schedule order."""

    config: LoadConfig
    summary: LatencySummary
    histogram: Histogram
    latencies_ms: np.ndarray
    source_shares: Mapping[str, float]
    accuracy: float
    requests: int
    sent: int
    answered: int
    failed: int
    overflowed: int
    unsent: int
    send_lag_p99_ms: float
    send_lag_max_ms: float
    server_timings_ms: Mapping[str, float]  # median of each numeric ``*_ms`` response parameter
    records: tuple[RequestRecord, ...]  # every scheduled request, warm-up included
    # arrival "burst": each measured burst's latency (until its last answer); bursts with a
    # failed request are left out and counted in ``bursts_failed``
    burst_summary: LatencySummary | None = None
    bursts_failed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the summary and counts (not the raw latencies or records)."""
        return {
            "url": self.config.endpoint,
            "rate": self.config.rate,
            "arrival": self.config.arrival,
            "seed": self.config.seed,
            "warmup": self.config.warmup,
            "requests": self.requests,
            "sent": self.sent,
            "answered": self.answered,
            "failed": self.failed,
            "overflowed": self.overflowed,
            "unsent": self.unsent,
            "accuracy": _finite_or_none(self.accuracy),
            "source_shares": dict(self.source_shares),
            "send_lag_p99_ms": _finite_or_none(self.send_lag_p99_ms),
            "send_lag_max_ms": _finite_or_none(self.send_lag_max_ms),
            "server_timings_ms": dict(self.server_timings_ms),
            "summary": self.summary.to_dict(),
            **({"burst_size": self.config.burst_size} if self.config.arrival == "burst" else {}),
            **({"burst_summary": self.burst_summary.to_dict(), "bursts_failed": self.bursts_failed}
               if self.burst_summary else {}),
        }  # fmt: skip


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


# --- the run -------------------------------------------------------------------------------------


class _Run:
    """The state of one run: the schedule, the in-flight count and what each request did."""

    def __init__(self, config: LoadConfig, images: np.ndarray, labels: np.ndarray) -> None:
        self.config = config
        self.labels = labels
        total = config.warmup + config.requests
        self.offsets = arrival_offsets(total, config.rate, config.arrival, config.seed, config.burst_size)
        self.image_of = np.arange(total) % len(images)
        # Rendered before the clock starts, once per distinct image, so the schedule never waits on it.
        auth = {"Authorization": f"Bearer {config.token}"} if config.token else {}
        self.payloads = [
            (body, {**headers, **auth})
            for body, headers in (render_payload(images[i], config) for i in range(min(total, len(images))))
        ]
        self.path = urlsplit(config.endpoint).path
        self._scores = config.tensor.output if config.tensor else "logits"
        self.records: list[RequestRecord | None] = [None] * total
        self.sent_at: list[float | None] = [None] * total
        self.done_at: list[float | None] = [None] * total
        self.in_flight = 0
        self.start = 0.0

    def _record(self, i: int, status: str, **fields: Any) -> None:
        self.records[i] = RequestRecord(
            i, int(self.image_of[i]), i < self.config.warmup, float(self.offsets[i]), status, **fields
        )

    async def schedule(self, client: HttpClient, tasks: list[asyncio.Task]) -> None:
        """Admit each request at its scheduled time; never wait for answers (open loop)."""
        self.start = time.perf_counter() + _START_LEAD_S
        for i, offset in enumerate(self.offsets):
            due = self.start + offset
            while (delay := due - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            await asyncio.sleep(0)  # when behind schedule, still let in-flight requests progress
            if self.in_flight >= self.config.max_in_flight:
                self._record(i, "overflow")
                continue
            self.in_flight += 1  # counted at admission: the task may not start before the next check
            tasks.append(asyncio.create_task(self.send(client, i, due)))

    async def send(self, client: HttpClient, i: int, due: float) -> None:
        body, headers = self.payloads[self.image_of[i] % len(self.payloads)]
        self.sent_at[i] = sent = time.perf_counter()
        fields: dict[str, Any] = {"sent_s": sent - self.start}
        try:
            reply = await client.request("POST", self.path, body, headers, self.config.timeout_s)
            payload, status, reply_headers = reply.body, reply.status, CIMultiDict(reply.headers)
            self.done_at[i] = done = time.perf_counter()
            fields["latency_s"] = done - due
            if status != 200:
                return self._record(i, str(status), **fields)
            try:
                answer = parse_answer(payload, reply_headers, self.config.target, self._scores)
            except ProtocolError:
                return self._record(i, "bad-response", **fields)
            truth = int(self.labels[self.image_of[i]])
            self._record(
                i, "ok", **fields, label=answer.label, correct=answer.label == truth, source=answer.source,
                timings=MappingProxyType(answer.timings),
            )  # fmt: skip
        except TimeoutError:
            self.done_at[i] = time.perf_counter()
            self._record(i, "timeout", **fields)
        except (OSError, ProtocolError):  # refused, reset, or not HTTP at all
            self.done_at[i] = time.perf_counter()
            self._record(i, "connection", **fields)
        finally:
            self.in_flight -= 1

    def finish(self, ended: float) -> LoadResult:
        """Fill in what never finished, then compute the statistics of the measured requests."""
        for i, record in enumerate(self.records):
            if record is None:
                sent = self.sent_at[i]
                if sent is None:
                    self._record(i, "unsent")
                else:
                    self._record(i, "cancelled", sent_s=sent - self.start)
        records = tuple(r for r in self.records if r is not None)
        measured = [r for r in records if not r.warmup]
        ok = [r for r in measured if r.status == "ok"]
        latencies = np.array([r.latency_s for r in ok], dtype=np.float64)
        histogram = Histogram()
        histogram.record(latencies)
        first = self.start + self.offsets[self.config.warmup]
        last_event = max(
            [self.start + self.offsets[-1], *(d for d in self.done_at[self.config.warmup :] if d is not None)]
        )
        duration = max(min(last_event, ended) - first, 1e-9)
        errors = Counter(r.status for r in measured if r.status != "ok")
        sources = Counter(r.source or UNREPORTED for r in ok)
        lags = np.array([r.sent_s - r.scheduled_s for r in measured if r.sent_s is not None])
        timing_keys = sorted({k for r in ok for k in r.timings})
        sent = sum(r.sent_s is not None for r in measured)
        bursts, bursts_failed = self._bursts(measured)
        return LoadResult(
            config=self.config,
            summary=LatencySummary.from_histogram(histogram, duration, errors),
            histogram=histogram,
            latencies_ms=latencies * 1e3,
            source_shares=MappingProxyType({s: n / len(ok) for s, n in sorted(sources.items())}),
            accuracy=sum(bool(r.correct) for r in ok) / len(ok) if ok else math.nan,
            requests=len(measured),
            sent=sent,
            answered=len(ok),
            failed=sent - len(ok),
            overflowed=errors["overflow"],
            unsent=errors["unsent"],
            send_lag_p99_ms=float(np.percentile(lags, 99) * 1e3) if lags.size else math.nan,
            send_lag_max_ms=float(lags.max() * 1e3) if lags.size else math.nan,
            server_timings_ms=MappingProxyType(
                {k: float(np.median([r.timings[k] for r in ok if k in r.timings])) for k in timing_keys}
            ),
            records=records,
            burst_summary=LatencySummary.of(bursts, duration) if self.config.arrival == "burst" else None,
            bursts_failed=bursts_failed,
        )

    def _bursts(self, measured: list[RequestRecord]) -> tuple[list[float], int]:
        """(latency of every measured burst whose requests were all answered, bursts that were
        not). A burst is measured when none of its requests is a warm-up one."""
        if self.config.arrival != "burst":
            return [], 0
        size = self.config.burst_size
        members: dict[int, list[RequestRecord]] = {}
        for r in measured:
            members.setdefault(r.index // size, []).append(r)
        whole = [rs for rs in members.values() if rs[0].index % size == 0 and len(rs) == size]
        answered = [rs for rs in whole if all(r.status == "ok" for r in rs)]
        # a burst's latency counts from its scheduled time, shared by all its requests
        return [max(r.latency_s or 0.0 for r in rs) for rs in answered], len(whole) - len(answered)


async def run_load(config: LoadConfig, images: np.ndarray, labels: np.ndarray) -> LoadResult:
    """Run one open-loop load test against ``config.endpoint`` with the given test images.

    images: uint8 (N, H, W[, C]); request i carries image ``i % N`` and is judged against
    ``labels[i % N]``. Returns when every request has an outcome or the overall timeout passed.
    """
    images = as_hwc(images)
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
        raise ConfigError(f"need one label per image: {len(images)} images, labels of shape {labels.shape}")
    run = _Run(config, images, labels)
    overall = config.overall_timeout_s or float(run.offsets[-1]) + config.timeout_s + 5.0
    # The lean keep-alive client of the front end: the generator shares the machine with what
    # it measures, so its CPU per request is taken from the system under test.
    client = HttpClient(config.url)
    tasks: list[asyncio.Task] = []
    try:
        async with asyncio.timeout(overall + _START_LEAD_S):
            await run.schedule(client, tasks)
            await asyncio.gather(*tasks)
    except TimeoutError:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        client.close()
    ended = time.perf_counter()
    return run.finish(ended)


def warmup_for(requests: int) -> int:
    """The unmeasured requests the serving benchmarks send before ``requests`` measured ones: a
    tenth, at least 50, so connections are open and the runtime warm when measuring starts."""
    return max(50, requests // 10)


def run_load_sync(config: LoadConfig, images: np.ndarray, labels: np.ndarray) -> LoadResult:
    """:func:`run_load` for callers without an event loop (scripts, the CLI, notebooks)."""
    return run(run_load(config, images, labels))


# --- reporting and the CLI -----------------------------------------------------------------------


def environment() -> dict[str, Any]:
    """Where a result was measured; printed beside every result, because a latency number
    without its machine is not a result."""
    return {
        "python": platform.python_version(),
        "httptools": httptools.__version__,
        "platform": platform.platform(terse=True),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }


def format_result(result: LoadResult) -> str:
    """A plain-text table of one run, for people."""
    s, c = result.summary, result.config
    env = environment()
    rows = [
        ("target", f"{c.endpoint} ({'PNG' if c.target == 'predict' else 'binary' if c.binary else 'JSON'}"
                   f"{', FP32 ' + c.tensor.input if c.tensor else ''})"),
        ("load", f"{c.arrival}{f' of {c.burst_size}' if c.arrival == 'burst' else ''} {c.rate:g} req/s, "
                 f"seed {c.seed}, {c.warmup} warm-up excluded"),
        ("requests", f"{result.requests} scheduled, {result.sent} sent, {result.answered} answered, "
                     f"{result.failed} failed, {result.overflowed} overflowed, {result.unsent} unsent"),
        ("latency ms", f"p50 {s.p50_ms:.2f}  p90 {s.p90_ms:.2f}  p99 {s.p99_ms:.2f}  p99.9 {s.p999_ms:.2f}"),
        ("", f"mean {s.mean_ms:.2f}  std {s.std_ms:.2f}  max {s.max_ms:.2f}"),
        ("throughput", f"{s.throughput_rps:.1f} answers/s over {s.duration_s:.2f} s"),
        ("accuracy", f"{result.accuracy:.4f}" if math.isfinite(result.accuracy) else "n/a"),
        ("sources", ", ".join(f"{k} {v:.1%}" for k, v in result.source_shares.items()) or "n/a"),
        ("errors", ", ".join(f"{k} {v}" for k, v in s.errors.items()) or "none"),
        *([("bursts ms", f"p50 {result.burst_summary.p50_ms:.2f}  p99 {result.burst_summary.p99_ms:.2f}  "
                         f"({result.burst_summary.count} bursts, {result.bursts_failed} with a failure)")]
          if result.burst_summary else []),
        ("send lag ms", f"p99 {result.send_lag_p99_ms:.2f}  max {result.send_lag_max_ms:.2f}"),
        ("server ms", ", ".join(f"{k} {v:.2f}" for k, v in result.server_timings_ms.items()) or "n/a"),
        ("environment", f"python {env['python']}, {env['platform']}, {env['cpus']} cpus"),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The load generator's flags, on a new parser or on a ``collage loadgen`` subparser."""
    parser = parser or argparse.ArgumentParser(
        prog="collage loadgen", description="open-loop load generator (latency from the schedule)"
    )
    parser.add_argument("--url", required=True, help="base URL of the server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--rate", type=float, required=True, help="mean arrival rate, requests per second")
    parser.add_argument("--requests", type=int, required=True, help="measured requests (after warm-up)")
    parser.add_argument(
        "--model", default="classifier", help="model name in /v2/models/NAME/infer (default: the front end's)"
    )
    parser.add_argument("--arrival", default="poisson", choices=ARRIVALS, help="arrival process")
    parser.add_argument(
        "--burst-size", type=int, default=9, help="requests sent at the same instant (--arrival burst)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival schedule")
    parser.add_argument("--warmup", type=int, default=20, help="requests sent first and not measured")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-request timeout, seconds")
    parser.add_argument("--overall-timeout", type=float, help="whole-run limit (default: schedule + 15 s)")
    parser.add_argument("--max-in-flight", type=int, default=256, help="beyond this, count an overflow")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--predict", action="store_true", help="POST PNG bodies to {url}/predict instead")
    what.add_argument(
        "--model-file", type=Path, metavar="PATH.onnx",
        help="the server runs this exported file itself (Triton, KServe, MLServer): send its own "
             "tensors (FP32 input) and read the label from its logits",
    )  # fmt: skip
    parser.add_argument("--json-body", action="store_true", help="V2 JSON tensors instead of binary")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--token-file", type=Path, help="bearer token of a protected server ($COLLAGE_TOKEN)")
    parser.add_argument("--dataset", default="fashion-mnist", choices=DATASET_KINDS, help="test images")
    parser.add_argument("--data-dir", type=Path, help="dataset folder (default for fashion-mnist: Debian's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``collage loadgen``: 0 when some request was answered, 1 when none was, 2 on our errors."""
    args = build_parser().parse_args(argv)
    try:
        config = LoadConfig(
            url=args.url,
            rate=args.rate,
            requests=args.requests,
            model=args.model,
            arrival=args.arrival,
            burst_size=args.burst_size,
            seed=args.seed,
            warmup=args.warmup,
            target="predict" if args.predict else "tensor" if args.model_file else "v2",
            tensor=TensorInput.of_file(args.model_file) if args.model_file else None,
            binary=not args.json_body,
            timeout_s=args.timeout,
            overall_timeout_s=args.overall_timeout,
            max_in_flight=args.max_in_flight,
            token=load_token(args.token_file),
        )
        test = load_dataset(args.dataset, "test", args.data_dir)
        result = run_load_sync(config, test.images, test.labels)
    except CollageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**result.to_dict(), "dataset": test.name, "environment": environment()}))
    else:
        print(format_result(result))
    return 0 if result.answered else 1
