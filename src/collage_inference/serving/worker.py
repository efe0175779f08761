"""A model worker: one :class:`ModelServer` behind the Open Inference Protocol (KServe V2) over HTTP.

    collage worker --model models/fashion-mnist/scnn.onnx --port 0
    python -m collage_inference.serving.worker --config worker.json   # how launchers start it

The V2 endpoints are listed in :meth:`WorkerApi.router`. An inference (JSON or binary tensors)
takes one input: the model's own ``input`` (FP32, (N, C, H, W), pixels in [0, 1]) or ``image``
(UINT8 (H, W), (H, W, C) or (N, H, W[, C]) of any size, resized with the training resize). It
answers ``label`` (INT64, (N,) or (N, S*S)) and ``probabilities`` (FP32, (N, classes) or
(N, S*S, classes + 1)), with ``queue_ms``, ``compute_ms`` and ``injected_ms`` in the response
parameters; the model's facts (kind, grid, labels, image_size, channels) are its metadata
parameters. With a shared token (``$COLLAGE_TOKEN`` or ``--token-file``) every endpoint but the
health checks wants ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Awaitable
from dataclasses import replace
from pathlib import Path

from collage_inference.config import (
    Limits,
    SlowdownSettings,
    WorkerSettings,
    add_slowdown_arguments,
    slowdown_overrides,
)
from collage_inference.errors import CollageError, ConfigError, ListenError, ModelNotFoundError, ProtocolError
from collage_inference.serving.metrics import Exposition, Metric, counter, gauge
from collage_inference.serving.modelserver import ModelServer, Result
from collage_inference.serving.runtime import BACKENDS
from collage_inference.serving.v2 import (
    HEADER_LENGTH,
    SERVER_METADATA,
    InferRequest,
    InferResponse,
    InferTensor,
    V2Parser,
    render_infer_response,
)
from collage_inference.serving.web.routes import Request, Response, Router, load_token, model_routes, run
from collage_inference.serving.web.server import serve

log = logging.getLogger(__name__)

VERSION = "1"
OUTPUTS = ("label", "probabilities")
PLATFORMS = {"onnx": "onnxruntime_onnx", "torch": "pytorch_torchscript"}
_LENGTH = HEADER_LENGTH.lower()


class WorkerApi:
    def __init__(self, server: ModelServer) -> None:
        self.server = server
        self.parser = V2Parser(server.settings.limits)
        self.exposition = Exposition(self._families)

    def router(self, token: str | None = None) -> Router:
        routes = model_routes(self.server.name, VERSION, self, SERVER_METADATA)
        return Router(routes, token=token)

    def check_model(self, request: Request) -> None:
        """404 unless the URL names this server's model (and, if given, its one version)."""
        served = self.server.name
        name = request.params.get("name", served)  # an exact route names the model
        version = request.params.get("version")
        if name != served:
            raise ModelNotFoundError(f"model {name!r} is not served here; this worker serves {served!r}")
        if version is not None and version != VERSION:
            raise ModelNotFoundError(f"model {name!r} has no version {version!r}; it has version {VERSION}")

    def infer(self, request: Request) -> Response | Awaitable[Response]:
        """Parse, check and admit the call; answer at once when it ran inline."""
        self.check_model(request)
        parsed = self.parser.parse_request(request.body, request.headers.get(_LENGTH))
        if len(parsed.inputs) != 1:
            raise ProtocolError(
                f"send exactly one input, 'input' (FP32 N,C,H,W) or 'image' (UINT8), got {len(parsed.inputs)}"
            )
        unknown = [r.name for r in parsed.outputs_requested if r.name not in OUTPUTS]
        if unknown:
            raise ProtocolError(
                f"unknown output(s) {', '.join(map(repr, unknown))}; this model has label, probabilities"
            )
        tensor = parsed.inputs[0]
        if tensor.name == "input" and tensor.datatype == "FP32":
            result = self.server.infer(self.server.check_pixels(tensor.data), is_images=False)
        elif tensor.name == "image" and tensor.datatype == "UINT8":
            result = self.server.infer(self.server.check_batch(tensor.data))
        else:
            raise ProtocolError(
                f"unexpected input {tensor.name!r} ({tensor.datatype}); send 'input' as FP32 (N, C, H, W) "
                "pixels in [0, 1] or 'image' as UINT8 (H, W), (H, W, C) or (N, H, W[, C])"
            )
        if isinstance(result, Result):
            return self._respond(parsed, result)
        return self._respond_later(parsed, result)

    async def _respond_later(self, parsed: InferRequest, pending: Awaitable[Result]) -> Response:
        return self._respond(parsed, await pending)

    def _respond(self, parsed: InferRequest, result: Result) -> Response:
        """The outputs the request asked for (all by default), with the timings that explain them."""
        wanted = [r.name for r in parsed.outputs_requested] or list(OUTPUTS)
        arrays = {"label": result.prediction.labels, "probabilities": result.prediction.probabilities}
        parameters = {f"{k}_ms": round(v * 1e3, 3) for k, v in result.timings.items()}
        parameters |= {"kind": self.server.meta.kind, "grid": self.server.meta.grid}
        outputs = tuple(InferTensor.of(n, arrays[n]) for n in wanted)
        response = InferResponse(self.server.name, outputs, parsed.id, VERSION, parameters)
        body, headers = render_infer_response(response, parsed)
        return Response(body, 200, headers)

    def ready(self, request: Request) -> Response:
        return Response.json({"ready": self.server.ready}, 200 if self.server.ready else 503)

    def model_ready(self, request: Request) -> Response:
        self.check_model(request)
        ok = self.server.ready
        return Response.json({"name": self.server.name, "ready": ok}, 200 if ok else 503)

    def metadata(self, request: Request) -> Response:
        self.check_model(request)
        server = self.server
        channels, size, _ = server.runner.input_shape
        per_input = [server.meta.grid**2] if server.meta.kind == "collage" else []
        scores = server.meta.config.outputs  # per image, or per cell of a collage
        metadata = {
            "name": server.name,
            "versions": [VERSION],
            "platform": PLATFORMS[server.runner.backend],
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [-1, channels, size, size]},
                {"name": "image", "datatype": "UINT8", "shape": [-1, -1, -1, -1]},
            ],
            "outputs": [
                {"name": "label", "datatype": "INT64", "shape": [-1, *per_input]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, *per_input, scores]},
            ],
            "parameters": server.facts(),
        }
        return Response.json(metadata)

    def metrics(self, request: Request) -> Response:
        return Response(self.exposition.render(), 200, {"Content-Type": Exposition.CONTENT_TYPE})

    def _families(self) -> list[Metric]:
        server, model = self.server, ("model",)
        name = [server.name]
        return [
            gauge("collage_worker_queue_depth", "Calls in the queue", model, [(name, server.queued)]),
            gauge("collage_worker_queue_limit", "Calls admitted before 429", model,
                  [(name, server.settings.max_queue)]),
            counter("collage_worker_requests", "Inference calls finished", model, [(name, server.served)]),
            counter("collage_worker_shed", "Inference calls refused with 429", model, [(name, server.shed)]),
        ]  # fmt: skip


async def serve_worker(settings: WorkerSettings) -> None:
    """Serve until SIGTERM or SIGINT; print ``ready on http://HOST:PORT`` once listening."""
    server = ModelServer(settings)
    try:
        log.info("serving %s (%s, grid %d) with %s", server.name, server.meta.kind, server.meta.grid,
                 server.runner.backend)  # fmt: skip
        router = WorkerApi(server).router(load_token(settings.token_file))
        await serve(router, settings.host, settings.port, limits=settings.limits, draining=server.drain)
    finally:
        server.close()


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The worker's flags (each defaults to the settings' own default), or ``--config FILE``."""
    p = parser or argparse.ArgumentParser(prog="collage worker", description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, help="a settings file (JSON) instead of the flags below")
    p.add_argument("--model", type=Path, help="model file (.onnx, or .pt with --backend torch)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, help="port; 0 picks a free one (printed when ready; default 8001)")
    p.add_argument("--backend", choices=BACKENDS, help="inference engine (default onnx)")
    p.add_argument("--threads", type=int, help="intra-op threads of the engine (default 1)")
    p.add_argument("--name", help="model name in URLs (default: the model's own name)")
    p.add_argument("--max-queue", type=int, help="calls admitted before 429 (default 64)")
    p.add_argument("--max-batch", type=int, help="images per call before 413 (default 256)")
    p.add_argument("--max-body-mb", type=float, help="request body limit in MiB (default 64)")
    p.add_argument("--body-timeout", type=float, help="seconds a client may take to send a request (408)")
    p.add_argument(
        "--token-file", type=Path, help="file holding the shared bearer token (default: $COLLAGE_TOKEN)"
    )
    add_slowdown_arguments(p.add_argument_group("straggler injection (off by default)"))
    return p


def settings_from_args(args: argparse.Namespace) -> WorkerSettings:
    """The settings file, or the flags given on top of the defaults."""
    if args.config is not None:
        return WorkerSettings.load(args.config)
    if args.model is None:
        raise ConfigError("give --model PATH (or --config FILE)")
    given = {k: v for k, v in vars(args).items() if v is not None}
    limits = Limits()
    if "max_body_mb" in given:
        limits = replace(limits, max_body_bytes=int(given["max_body_mb"] * 2**20))
    if "body_timeout" in given:
        limits = replace(limits, body_timeout=given["body_timeout"])
    slow = slowdown_overrides(args)
    keys = ("host", "port", "backend", "threads", "name", "max_queue", "max_batch", "token_file")
    return WorkerSettings(
        args.model,
        limits=limits,
        slowdown=SlowdownSettings(**slow) if slow else None,
        **{k: given[k] for k in keys if k in given},
    )


def main(argv: list[str] | None = None) -> int:
    """``collage worker``: serve; our errors print one line and exit 2 (3: the port is taken)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    try:
        run(serve_worker(settings_from_args(args)))
    except CollageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ListenError.exit_code if isinstance(exc, ListenError) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
