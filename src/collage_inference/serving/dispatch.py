"""Dispatch: the front end's view of its workers, and the only place that talks to them.

A :class:`WorkerClient` speaks the Open Inference Protocol (KServe V2, binary tensors) to one
model server; a :class:`WorkerPool` picks among several: least outstanding requests first,
then the lowest recent latency. A worker that fails (connection refused, timeout, garbage) is
marked down and probed in the background until it is ready again, so ``/v2/health/ready`` and
the pick both tell the truth. Every transport failure becomes a :class:`WorkerError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
import numpy as np

from collage_inference.errors import ProtocolError, UnavailableError, WorkerError
from collage_inference.serving.kept import Kept
from collage_inference.serving.protocol import (
    InferRequest,
    InferTensor,
    RequestedOutput,
    parse_infer_response,
    render_infer_request,
)
from collage_inference.serving.wire import HttpClient, HttpReply

HEADER_LENGTH = "Inference-Header-Content-Length"
_WANT = (RequestedOutput("probabilities", binary=True),)
_WORKER_TIMINGS = ("queue_ms", "compute_ms", "injected_ms")
_UINT8 = np.dtype(np.uint8)
_MAX_PREFIXES = 64  # image batch shapes whose call head a worker client keeps


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker's V2 model metadata says about the model it serves."""

    model: str
    kind: str  # "scnn" or "collage"
    grid: int
    labels: tuple[str, ...]
    image_size: int  # s-CNN input side, or collage tile side
    channels: int


@dataclass(frozen=True, eq=False)
class Inference:
    """probabilities: (N, classes) or (N, S*S, classes + 1); timings in seconds."""

    probabilities: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)


def _infer_head(shape: tuple[int, ...]) -> tuple[bytes, dict[str, str]]:
    """The JSON header and the HTTP headers of an infer call on a uint8 image batch of
    ``shape``. They depend on the shape alone: a call carries no id, since its answer comes
    back on the call's own connection."""
    request = InferRequest(None, (InferTensor.of("image", np.zeros(shape, np.uint8)),), _WANT)
    body, headers = render_infer_request(request, binary_inputs=True)
    return body[: int(headers[HEADER_LENGTH])], headers


class Worker(Protocol):
    """What the front end needs of a worker: the transport interface (tests use a fake)."""

    id: str
    url: str
    up: bool
    outstanding: int
    latency: float

    def infer(self, images: np.ndarray, request_id: str, timeout: float) -> Awaitable[Inference]:
        """Start the call (a transport may send it before returning); await the result."""
        ...

    async def ready(self, timeout: float = 1.0) -> bool: ...

    def retarget(self, url: str) -> None: ...


class WorkerClient:
    """One V2 model server over HTTP. Not thread-safe: lives on the front end's event loop."""

    def __init__(
        self,
        worker_id: str,
        url: str,
        model: str,
        session: aiohttp.ClientSession,
        token: str | None = None,
    ) -> None:
        self.id, self.model = worker_id, model
        self._session = session
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._http: HttpClient | None = None
        self._prefixes: Kept[tuple[int, ...], bytes] = Kept(_MAX_PREFIXES)  # shape -> call head
        self.retarget(url)
        self.outstanding = 0
        self.up = True
        self.failures = 0
        self.latency = 0.0  # EWMA of round trips, seconds
        self.info: WorkerInfo | None = None

    def retarget(self, url: str) -> None:
        """Point this client at a new address (the worker restarted elsewhere); calls in flight
        finish against the old one. It counts as down until its readiness probe answers."""
        if self._http is not None:
            self._http.close()
        self.url = url.rstrip("/")
        # The hot path (infer) goes through the lean client; metadata and probes through aiohttp.
        self._http = HttpClient(self.url)
        self._infer_path = f"{urlsplit(self.url).path}/v2/models/{self.model}/infer"
        self._prefixes.clear()

    def close(self) -> None:
        """Close the idle keep-alive connections of the inference path."""
        self._http.close()

    def infer(self, images: np.ndarray, request_id: str, timeout: float) -> Awaitable[Inference]:
        """Send uint8 images (N, H, W, C) as the ``image`` input, now when a keep-alive
        connection is idle; the awaitable gives their class probabilities. ``request_id`` is
        not sent (the answer comes back on the call's own connection).

        The call's slot in ``outstanding`` was taken by :meth:`WorkerPool.pick`; it is given
        back when the call ends, however it ends.
        """
        start = time.perf_counter()
        try:
            pixels = (images if images.dtype == _UINT8 else images.astype(np.uint8)).tobytes()
            reply = self._http.send(self._prefix(images.shape) + pixels, timeout)
        except OSError as exc:  # the write itself failed: the connection is broken
            self.outstanding -= 1
            self.mark_down()
            raise WorkerError(f"worker {self.id} at {self.url} failed: {exc!r}") from exc
        except BaseException:
            self.outstanding -= 1
            raise
        return self._result(reply, len(images), start)

    def _prefix(self, shape: tuple[int, ...]) -> bytes:
        """The HTTP head and the JSON header of a call on images of ``shape``: the same for
        every call of that shape, so rendered once."""
        prefix = self._prefixes.get(shape)
        if prefix is None:
            header, headers = _infer_head(shape)
            length = len(header) + math.prod(shape)
            head = self._http.post_head(self._infer_path, {**headers, **self._auth}, length)
            prefix = self._prefixes.keep(shape, head + header)
        return prefix

    async def _result(self, pending: Awaitable[HttpReply], count: int, start: float) -> Inference:
        try:
            reply = await pending
            if reply.status != 200:
                # A 4xx (full queue, refused input) is the worker alive and saying why; a 5xx
                # is a broken worker, so it is marked down until its readiness probe answers.
                if reply.status >= 500:
                    self.mark_down()
                raise WorkerError(f"worker {self.id} answered HTTP {reply.status}: {reply.body[:300]!r}")
            response = parse_infer_response(reply.body, reply.headers.get(HEADER_LENGTH.lower()))
            probabilities = self._checked(response.output("probabilities").data, count)
        except (TimeoutError, ProtocolError, OSError) as exc:
            self.mark_down()
            raise WorkerError(f"worker {self.id} at {self.url} failed: {exc!r}") from exc
        finally:
            self.outstanding -= 1
        elapsed = time.perf_counter() - start
        self.latency = elapsed if self.latency == 0 else 0.8 * self.latency + 0.2 * elapsed
        self.failures = 0
        params = response.parameters
        timings = {k[:-3]: float(params[k]) / 1e3 for k in _WORKER_TIMINGS if k in params}
        timings["round_trip"] = elapsed
        return Inference(probabilities, timings)

    def _checked(self, probabilities: np.ndarray, count: int) -> np.ndarray:
        """The probabilities if their shape is what this worker's model answers, else garbage."""
        info = self.info
        if info is None:
            expected: tuple[int, ...] | None = None
        elif info.kind == "collage":
            expected = (count, info.grid * info.grid, len(info.labels))
        else:
            expected = (count, len(info.labels))
        if (expected is not None and probabilities.shape != expected) or len(probabilities) != count:
            raise ProtocolError(
                f"probabilities of shape {probabilities.shape}, expected {expected or (count, '...')}"
            )
        return probabilities

    def mark_down(self) -> None:
        self.up = False
        self.failures += 1

    async def ready(self, timeout: float = 1.0) -> bool:
        """Whether the worker answers its model's readiness check now."""
        try:
            async with self._session.get(
                f"{self.url}/v2/models/{self.model}/ready",
                headers=self._auth,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                await resp.read()
                return resp.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    async def describe(self, timeout: float = 5.0) -> WorkerInfo:
        """Read the model's metadata: kind, grid, labels, input geometry."""
        try:
            async with self._session.get(
                f"{self.url}/v2/models/{self.model}",
                headers=self._auth,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                if resp.status == 401:
                    raise WorkerError(
                        f"worker {self.url} refused the front end's token (401); start both with the "
                        "same $COLLAGE_TOKEN or --token-file"
                    )
                doc: dict[str, Any] = await resp.json()
            params = doc["parameters"]
            self.info = WorkerInfo(
                self.model,
                str(params["kind"]),
                int(params["grid"]),
                tuple(params["labels"]),
                int(params["image_size"]),
                int(params["in_channels"]),
            )
        except (TimeoutError, aiohttp.ClientError, OSError, KeyError, TypeError, ValueError) as exc:
            raise WorkerError(
                f"cannot read model metadata of {self.model!r} at {self.url}: {exc!r}; is it a "
                "collage-inference worker (its metadata parameters need kind, grid, labels, "
                "image_size, in_channels)?"
            ) from exc
        return self.info


class WorkerPool:
    """Workers serving the same model; picks one per call."""

    def __init__(self, workers: Iterable[Worker]) -> None:
        self.workers = list(workers)
        self.picked: Counter[str] = Counter()  # calls sent to each worker id, since start

    def __len__(self) -> int:
        return len(self.workers)

    @property
    def ready(self) -> bool:
        return any(w.up for w in self.workers)

    def pick(self, exclude: str | None = None) -> Worker:
        """The up worker with the fewest outstanding calls (then the lowest recent latency),
        with one more outstanding call counted on it now: requests admitted in the same
        event-loop turn must see each other, before any call task has started.

        Falls back to the excluded worker, then to down workers, rather than refusing: a
        worker marked down may be back, and the call will tell. Follow every pick with
        ``infer`` on the picked worker, which gives the slot back.
        """
        candidates = [w for w in self.workers if w.up and w.id != exclude]
        if not candidates:
            candidates = [w for w in self.workers if w.up] or self.workers
        if not candidates:
            raise UnavailableError("no worker is configured for this model")
        return self._take(min(candidates, key=lambda w: (w.outstanding, w.latency)))

    def pick_idle(self, exclude: str | None = None) -> Worker | None:
        """Like :meth:`pick`, among up workers with no outstanding call only; None when every
        one is busy (nothing is counted then). A pool of one worker is a deployment that
        balances its own replicas (Ray Serve): its calls are always placed, as :meth:`pick`."""
        if len(self.workers) == 1:
            return self.pick(exclude)
        idle = [w for w in self.workers if w.up and w.outstanding == 0 and w.id != exclude]
        return self._take(min(idle, key=lambda w: w.latency)) if idle else None

    def _take(self, worker: Worker) -> Worker:
        """Count one more outstanding call on the picked worker (``infer`` gives it back)."""
        worker.outstanding += 1
        self.picked[worker.id] += 1
        return worker

    async def probe(self) -> None:
        """Bring back down workers that answer their readiness check."""
        down = [w for w in self.workers if not w.up]
        results = await asyncio.gather(*(w.ready() for w in down))
        for worker, ok in zip(down, results, strict=True):
            if ok:
                worker.up = True

    async def run_probes(self, interval: float) -> None:
        """Probe down workers every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):  # a probe must never kill the loop
                await self.probe()
