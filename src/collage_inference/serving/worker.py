"""A model worker: one model behind the Open Inference Protocol (KServe V2) over HTTP.

    python -m collage_inference.serving.worker --model models/fashion-mnist/scnn.onnx --port 0

Endpoints: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}``,
``/v2/models/{name}/ready``, ``/metrics`` (queue depth, load shed) and
``POST /v2/models/{name}/infer`` (JSON or binary tensors; the
``/versions/1/`` forms too). An inference takes one input: the model's own ``input`` (FP32,
(N, C, H, W), pixels in [0, 1]) or ``image`` (UINT8 (H, W), (H, W, C) or (N, H, W[, C]) of any
size, resized with the training resize). A 3-D ``image`` whose last axis is 1, 3 or 4 is one
(H, W, C) image; otherwise it is a batch of grey images (N, H, W). It answers ``label``
(INT64, (N,) or (N, S*S)) and ``probabilities`` (FP32, (N, classes) or (N, S*S, classes + 1)),
with ``queue_ms``, ``compute_ms`` and ``injected_ms`` in the response parameters.

The request path is: read body -> parse -> admit to the bounded queue -> compute on the one
compute thread (resize, model, softmax, injected delay) -> render. The event loop does not run
the model when a delay is injected, so health checks and parsing stay responsive while a
straggler sleeps. A worker that injects nothing runs small batches (up to
``INLINE_MAX_IMAGES`` images, a fraction of a millisecond each) on the event loop itself: the
hand-off to a thread and back costs about as much CPU as the model, and on a small machine
CPU per request is latency. With a
shared token (``$COLLAGE_TOKEN`` or ``--token-file``) every endpoint but the health checks
wants ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from collage_inference.errors import (
    CollageError,
    ConfigError,
    ModelNotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    ProtocolError,
)
from collage_inference.serving.http import load_token, read_body, run, server_middlewares
from collage_inference.serving.protocol import (
    HEADER_LENGTH,
    SERVER_METADATA,
    InferRequest,
    InferResponse,
    InferTensor,
    Limits,
    parse_infer_request,
    render_infer_response,
)
from collage_inference.serving.runtime import BACKENDS, BatchPrediction, ModelRunner, load_runner
from collage_inference.serving.server import FAST_ROUTES, FastRoutes, Payload, serve_app
from collage_inference.serving.slowdown import (
    CpuContention,
    Slowdown,
    add_slowdown_arguments,
    slowdown_from_args,
)

log = logging.getLogger(__name__)

VERSION = "1"
INLINE_MAX_IMAGES = 8
OUTPUTS = ("label", "probabilities")
PLATFORMS = {"onnx": "onnxruntime_onnx", "torch": "pytorch_torchscript"}


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs; ``name`` defaults to the model's own name."""

    model_path: Path
    backend: str = "onnx"
    threads: int = 1
    host: str = "127.0.0.1"
    port: int = 8001
    name: str | None = None
    slowdown: Slowdown | None = None
    contention: float = 0.0
    max_queue: int = 64
    max_batch: int = 256
    limits: Limits = field(default_factory=Limits)
    token: str | None = field(default=None, repr=False)  # shared bearer token; never printed

    def __post_init__(self) -> None:
        if self.max_queue < 1 or self.max_batch < 1:
            raise ConfigError("max_queue and max_batch must be at least 1")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must lie in 0..65535 (0 picks a free one), got {self.port}")


@dataclass(frozen=True, eq=False)
class _Result:
    prediction: BatchPrediction
    queue_s: float
    compute_s: float
    injected_s: float


class Worker:
    """The model, its compute thread and its bounded queue; the HTTP handlers call into it."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.runner: ModelRunner = load_runner(config.model_path, config.backend, config.threads)
        self.meta = self.runner.meta
        self.name = config.name or self.meta.name
        self.slowdown = config.slowdown
        self.contention = CpuContention(config.contention, config.threads) if config.contention else None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="compute")
        self._inline = self.slowdown is None and self.contention is None
        self._queued = 0  # admitted and not yet finished: waiting plus computing
        self.served = 0
        self.shed = 0
        self.metadata = self._metadata()

    def check_model(self, name: str, version: str | None) -> None:
        """404 unless the URL names this worker's model (and, if given, its one version)."""
        if name != self.name:
            raise ModelNotFoundError(f"model {name!r} is not served here; this worker serves {self.name!r}")
        if version is not None and version != VERSION:
            raise ModelNotFoundError(f"model {name!r} has no version {version!r}; it has version {VERSION}")

    def model_input(self, request: InferRequest) -> tuple[np.ndarray, bool]:
        """The request's one input as (array, is_uint8_images); the request is fully checked here,
        before it takes a queue slot."""
        if len(request.inputs) != 1:
            raise ProtocolError(
                "send exactly one input, 'input' (FP32 N,C,H,W) or 'image' (UINT8), "
                f"got {len(request.inputs)}"
            )
        unknown = [r.name for r in request.outputs_requested if r.name not in OUTPUTS]
        if unknown:
            raise ProtocolError(
                f"unknown output(s) {', '.join(map(repr, unknown))}; this model has label, probabilities"
            )
        tensor = request.inputs[0]
        if tensor.name == "input" and tensor.datatype == "FP32":
            x = tensor.data
            if x.ndim != 4 or x.shape[1:] != self.runner.input_shape:
                shape = ", ".join(map(str, self.runner.input_shape))
                raise ProtocolError(f"'input' must be (N, {shape}), got {x.shape}; or send a UINT8 'image'")
            is_images = False
        elif tensor.name == "image" and tensor.datatype == "UINT8":
            x = _image_batch(tensor.data)
            is_images = True
        else:
            raise ProtocolError(
                f"unexpected input {tensor.name!r} ({tensor.datatype}); send 'input' as FP32 (N, C, H, W) "
                "pixels in [0, 1] or 'image' as UINT8 (H, W), (H, W, C) or (N, H, W[, C])"
            )
        if len(x) > self.config.max_batch:
            raise PayloadTooLargeError(f"batch of {len(x)} exceeds the limit of {self.config.max_batch}")
        return x, is_images

    def infer(self, x: np.ndarray, is_images: bool) -> _Result | asyncio.Future[_Result]:
        """Run one batch: at once on the event loop when it is small, nothing is injected and
        nothing waits; else on the compute thread (a future). Refused when the queue is full."""
        if self._queued >= self.config.max_queue:
            self.shed += 1
            raise OverloadedError(
                f"{self._queued} requests are queued (limit {self.config.max_queue}); retry later"
            )
        if self._inline and len(x) <= INLINE_MAX_IMAGES and self._queued == 0:
            self._queued += 1
            try:
                return self._compute(x, is_images, time.perf_counter())
            finally:
                self._release()
        loop = asyncio.get_running_loop()
        self._queued += 1
        job = self._executor.submit(self._compute, x, is_images, time.perf_counter())
        # Release the slot when the job really ends, even if the client went away meanwhile.
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release))
        return asyncio.wrap_future(job)

    def handle_infer(self, body: bytes, header_length: str | None) -> Payload | Awaitable[Payload]:
        """One V2 infer call: the request body (and its binary header length) to the answer's
        body and headers, at once when the batch ran on the event loop, else an awaitable. Both
        HTTP paths (the front door's and aiohttp's) call this."""
        parsed = parse_infer_request(body, header_length, self.config.limits)
        x, is_images = self.model_input(parsed)
        result = self.infer(x, is_images)
        if isinstance(result, _Result):
            return render_infer_response(self.response(parsed, result), parsed)
        return self._answer_later(parsed, result)

    async def _answer_later(self, parsed: InferRequest, pending: asyncio.Future[_Result]) -> Payload:
        return render_infer_response(self.response(parsed, await pending), parsed)

    def _release(self) -> None:
        self._queued -= 1
        self.served += 1

    @property
    def queued(self) -> int:
        """Requests admitted and not yet finished (waiting plus computing)."""
        return self._queued

    def _compute(self, x: np.ndarray, is_images: bool, enqueued: float) -> _Result:
        start = time.perf_counter()
        prediction = self.runner.run_images(x) if is_images else self.runner.run_pixels(x)
        compute = time.perf_counter() - start
        injected = self.slowdown.injected_delay(compute, time.monotonic()) if self.slowdown else 0.0
        if injected > 0:
            time.sleep(injected)  # the worker is busy while it straggles, as in the published runs
        return _Result(prediction, start - enqueued, compute, injected)

    def response(self, request: InferRequest, result: _Result) -> InferResponse:
        """The outputs the request asked for (all by default), with the timings that explain them."""
        wanted = [r.name for r in request.outputs_requested] or list(OUTPUTS)
        arrays = {"label": result.prediction.labels, "probabilities": result.prediction.probabilities}
        parameters = {
            "queue_ms": round(result.queue_s * 1e3, 3),
            "compute_ms": round(result.compute_s * 1e3, 3),
            "injected_ms": round(result.injected_s * 1e3, 3),
            "kind": self.meta.kind,
            "grid": self.meta.grid,
        }
        outputs = tuple(InferTensor.of(n, arrays[n]) for n in wanted)
        return InferResponse(self.name, outputs, request.id, VERSION, parameters)

    def _metadata(self) -> dict[str, Any]:
        cfg = self.meta.config
        channels, size, _ = self.runner.input_shape
        per_input = (cfg.grid * cfg.grid,) if self.meta.kind == "collage" else ()
        return {
            "name": self.name,
            "versions": [VERSION],
            "platform": PLATFORMS[self.runner.backend],
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [-1, channels, size, size]},
                {"name": "image", "datatype": "UINT8", "shape": [-1, -1, -1, -1]},
            ],
            "outputs": [
                {"name": "label", "datatype": "INT64", "shape": [-1, *per_input]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, *per_input, cfg.outputs]},
            ],
            "parameters": {
                "kind": self.meta.kind,
                "grid": self.meta.grid,
                "labels": list(self.meta.labels),
                "input_size": cfg.input_size,
                "image_size": cfg.image_size,
                "in_channels": cfg.in_channels,
                "backend": self.runner.backend,
                "slowdown": self.slowdown.describe() if self.slowdown else "none",
                "contention": self.contention.describe() if self.contention else "none",
            },
        }

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self.contention:
            self.contention.stop()


def _image_batch(data: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, C) or (N, H, W[, C]) uint8 -> a batch (N, H, W[, C])."""
    if data.ndim == 2 or (data.ndim == 3 and data.shape[2] in (1, 3, 4)):
        data = data[None]
    if data.ndim not in (3, 4) or 0 in data.shape[1:]:
        raise ProtocolError(
            f"'image' must be (H, W), (H, W, C) or (N, H, W[, C]) with H, W >= 1, got {data.shape}"
        )
    if data.ndim == 4 and data.shape[3] not in (1, 3, 4):
        raise ProtocolError(f"'image' channels must be 1, 3 or 4, got {data.shape[3]}")
    return data


# --- HTTP ----------------------------------------------------------------------------------------

WORKER = web.AppKey("worker", Worker)


async def _infer(request: web.Request) -> web.Response:
    worker = request.app[WORKER]
    worker.check_model(request.match_info["name"], request.match_info.get("version"))
    body = await read_body(request, worker.config.limits)
    answer = worker.handle_infer(body, request.headers.get(HEADER_LENGTH))
    payload, headers = answer if isinstance(answer, tuple) else await answer
    return web.Response(body=payload, headers=headers)


async def _metrics(request: web.Request) -> web.Response:
    worker = request.app[WORKER]
    labels = f'model="{worker.name}"'
    lines = []
    for name, kind, help_text, value in (
        ("collage_worker_queue_depth", "gauge", "Requests admitted and not finished", worker.queued),
        ("collage_worker_queue_limit", "gauge", "Requests admitted before 429", worker.config.max_queue),
        ("collage_worker_requests_total", "counter", "Inference calls finished", worker.served),
        ("collage_worker_shed_total", "counter", "Inference calls refused with 429", worker.shed),
    ):
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{{{labels}}} {value}"]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8")


async def _server_metadata(request: web.Request) -> web.Response:
    return web.json_response(SERVER_METADATA)


async def _live(request: web.Request) -> web.Response:
    return web.json_response({"live": True})


async def _ready(request: web.Request) -> web.Response:
    return web.json_response({"ready": True})


async def _model_metadata(request: web.Request) -> web.Response:
    worker = request.app[WORKER]
    worker.check_model(request.match_info["name"], request.match_info.get("version"))
    return web.json_response(worker.metadata)


async def _model_ready(request: web.Request) -> web.Response:
    worker = request.app[WORKER]
    worker.check_model(request.match_info["name"], request.match_info.get("version"))
    return web.json_response({"name": worker.name, "ready": True})


def build_app(config: WorkerConfig) -> web.Application:
    """The worker's aiohttp application; loading and warming the model happens here, so a
    served app is ready by construction."""
    worker = Worker(config)
    app = web.Application(
        middlewares=server_middlewares(config.token), client_max_size=config.limits.max_body_bytes
    )
    app[WORKER] = worker
    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    app.router.add_get("/v2", _server_metadata)
    app.router.add_get("/v2/health/live", _live)
    app.router.add_get("/v2/health/ready", _ready)
    app.router.add_get("/metrics", _metrics)
    for prefix in (model, versioned):
        app.router.add_get(prefix, _model_metadata)
        app.router.add_get(prefix + "/ready", _model_ready)
        app.router.add_post(prefix + "/infer", _infer)

    def fast_infer(body: bytes, headers: Mapping[str, str]) -> Payload | Awaitable[Payload]:
        return worker.handle_infer(body, headers.get(HEADER_LENGTH.lower()))

    paths = (f"/v2/models/{worker.name}/infer", f"/v2/models/{worker.name}/versions/{VERSION}/infer")
    app[FAST_ROUTES] = FastRoutes(dict.fromkeys(paths, fast_infer), config.limits, config.token)

    async def start_contention(app: web.Application) -> None:
        if worker.contention:
            worker.contention.start()

    async def close_worker(app: web.Application) -> None:
        worker.close()

    app.on_startup.append(start_contention)
    app.on_cleanup.append(close_worker)
    return app


async def serve(config: WorkerConfig) -> None:
    """Serve until SIGTERM or SIGINT; print ``ready on http://HOST:PORT`` once listening."""
    app = build_app(config)
    worker = app[WORKER]
    log.info(
        "serving %s (%s, grid %d) with %s",
        worker.name,
        worker.meta.kind,
        worker.meta.grid,
        worker.runner.backend,
    )
    await serve_app(app, config.host, config.port)


def run_worker(
    model_path: Path | str,
    host: str = "127.0.0.1",
    port: int = 8001,
    backend: str = "onnx",
    threads: int = 1,
    slowdown: Slowdown | None = None,
    *,
    contention: float = 0.0,
    name: str | None = None,
    max_queue: int = 64,
    max_batch: int = 256,
    limits: Limits | None = None,
    token: str | None = None,
) -> int:
    """Serve one model in this process until SIGTERM/SIGINT; returns the exit code (0)."""
    config = WorkerConfig(
        Path(model_path),
        backend,
        threads,
        host,
        port,
        name,
        slowdown,
        contention,
        max_queue,
        max_batch,
        limits or Limits(),
        token,
    )
    run(serve(config))
    return 0


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The worker's flags, on a new parser or on a ``collage worker`` subparser."""
    parser = parser or argparse.ArgumentParser(prog="collage worker", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", required=True, type=Path, help="model file (.onnx, or .pt with --backend torch)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    parser.add_argument(
        "--port", type=int, default=8001, help="port; 0 picks a free one (printed when ready)"
    )
    parser.add_argument("--backend", default="onnx", choices=BACKENDS, help="inference engine")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of the engine")
    parser.add_argument("--name", help="model name in URLs (default: the model's own name)")
    parser.add_argument("--max-queue", type=int, default=64, help="requests admitted before 429")
    parser.add_argument("--max-batch", type=int, default=256, help="images per request before 413")
    parser.add_argument("--max-body-mb", type=float, default=64.0, help="request body limit in MiB")
    parser.add_argument(
        "--body-timeout", type=float, default=10.0, help="seconds a client may take to send a body (408)"
    )
    parser.add_argument(
        "--token-file", type=Path, help="file holding the shared bearer token (default: $COLLAGE_TOKEN)"
    )
    add_slowdown_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``collage worker``: parse flags, serve, and turn our errors into one line and exit code 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    try:
        return run_worker(
            args.model,
            args.host,
            args.port,
            args.backend,
            args.threads,
            slowdown_from_args(args),
            contention=args.contention,
            name=args.name,
            max_queue=args.max_queue,
            max_batch=args.max_batch,
            limits=Limits(max_body_bytes=int(args.max_body_mb * 2**20), body_timeout=args.body_timeout),
            token=load_token(args.token_file),
        )
    except CollageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
