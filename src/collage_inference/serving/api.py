"""The front end's endpoints: KServe V2 for tools, ``/predict`` for curl, ``/metrics`` for Prometheus,
``/dashboard`` for people (:mod:`~collage_inference.serving.dashboard`).

    collage frontend --scnn http://127.0.0.1:8001#scnn --collage http://127.0.0.1:8010#collage-3x3
    python -m collage_inference.serving.api --config frontend.json    # how launchers start it

:class:`FrontEndApi` declares the routes once, as data; the HTTP server
(:mod:`~collage_inference.serving.web.server`) and the Ray Serve ingress
(:mod:`~collage_inference.serving.ray.ingress`) both serve that one table over the same
:class:`~collage_inference.serving.frontend.FrontEnd`, so both answer alike, errors included.
Answers carry the label, class name, confidence, the ``source`` that answered (primary,
collage, replica) and timings. The workers' metadata tells the front end the class names and
each collage model's grid and tile size, so it can front any V2 server that publishes them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Awaitable, Sequence
from typing import Any

import orjson

from collage_inference.config import (
    FrontEndSettings,
    Limits,
    ServeConfig,
    WorkerEndpoint,
    add_frontend_arguments,
    frontend_overrides,
    load_config,
)
from collage_inference.errors import CollageError, ConfigError, ListenError, ModelNotFoundError, ProtocolError
from collage_inference.serving.dashboard import Dashboard
from collage_inference.serving.frontend import FrontEnd, build_frontend
from collage_inference.serving.metrics import Exposition, Metric
from collage_inference.serving.payloads import (
    answer_json,
    check_side,
    first_multipart_part,
    images_from_tensor,
    parse_image_bytes,
)
from collage_inference.serving.transports.http import HttpTransport
from collage_inference.serving.types import Answer
from collage_inference.serving.v2 import (
    HEADER_LENGTH,
    SERVER_METADATA,
    InferRequest,
    InferResponse,
    InferTensor,
    V2Parser,
    render_infer_response,
)
from collage_inference.serving.web.routes import (
    Request,
    Response,
    Route,
    Router,
    load_token,
    model_routes,
    run,
)
from collage_inference.serving.web.server import serve

log = logging.getLogger("collage_inference.serving")
LIMITS = Limits(max_body_bytes=16 * 2**20)  # a front end takes single images, not batches of tensors
MAX_IMAGES_PER_CALL = 64
OUTPUT_NAMES = ("label", "class_name", "confidence", "source")
_LENGTH = HEADER_LENGTH.lower()


class FrontEndApi:
    """The front end's endpoints over one :class:`FrontEnd`."""

    def __init__(self, frontend: FrontEnd, limits: Limits = LIMITS) -> None:
        self.frontend = frontend
        self.model_name = frontend.settings.model_name
        self.parser = V2Parser(limits)
        self.exposition = Exposition(self._families)

    def router(self, token: str | None = None) -> Router:
        """The route table: every entry point serves this one."""
        routes = model_routes(self.model_name, "1", self, SERVER_METADATA)
        routes.append(Route("POST", "/predict", self.predict))
        routes.append(Route("PUT", "/admin/workers/{id}", self.move_worker))
        routes += Dashboard(self.frontend).routes()
        return Router(routes, token=token, on_status=self.count_status)

    def count_status(self, status: int) -> None:
        """Count a refused request (4xx but 429, which is load shedding) in the metrics."""
        if 400 <= status < 500 and status != 429:
            self.frontend.metrics.bad_requests += 1

    def check_model(self, request: Request) -> None:
        """404 unless the URL names the model this front end serves."""
        name = request.params.get("name", self.model_name)  # an exact route names the served model
        if name != self.model_name:
            raise ModelNotFoundError(f"unknown model {name!r}; this front end serves {self.model_name!r}")

    # -- inference ------------------------------------------------------------------------------

    def infer(self, request: Request) -> Awaitable[Response]:
        """A V2 infer call. The request is checked and its worker calls are sent before this
        returns (a bad request raises here); the awaitable renders the answer."""
        self.check_model(request)
        parsed = self.parser.parse_request(request.body, request.headers.get(_LENGTH))
        if len(parsed.inputs) != 1:
            raise ProtocolError(f"send exactly one input tensor (the image), got {len(parsed.inputs)}")
        wanted = {r.name for r in parsed.outputs_requested}
        if wanted - set(OUTPUT_NAMES):
            raise ProtocolError(f"unknown outputs {sorted(wanted)}; have {', '.join(OUTPUT_NAMES)}")
        answers = self.submit(images_from_tensor(parsed.inputs[0]))
        return self._infer_response(answers, parsed, wanted)

    def submit(self, images: Sequence[Any]) -> Awaitable[list[Answer]]:
        """Admit each image as its own request now; the awaitable gives their answers."""
        if not images or len(images) > MAX_IMAGES_PER_CALL:
            raise ProtocolError(
                f"send between 1 and {MAX_IMAGES_PER_CALL} images per call, got {len(images)}"
            )
        checked = [check_side(image) for image in images]
        futures: list[asyncio.Future[Answer]] = []
        try:
            for image in checked:
                futures.append(self.frontend.submit(image))
        except Exception:  # refused part way (429): those admitted are answered but not awaited
            for future in futures:
                future.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise
        return _gathered(futures)

    async def _infer_response(
        self, pending: Awaitable[list[Answer]], parsed: InferRequest, wanted: set[str]
    ) -> Response:
        answers = await pending
        columns = (
            InferTensor.column("label", "INT64", [a.label for a in answers]),
            InferTensor.column("class_name", "BYTES", [a.class_name.encode() for a in answers]),
            InferTensor.column("confidence", "FP32", [a.confidence for a in answers]),
            InferTensor.column("source", "BYTES", [a.source.encode() for a in answers]),
        )
        # Where each answer's time went: admission to answer, and the timings of the call that
        # answered it (worker queue and compute, the round trip, a cell held for its primary).
        parameters: dict[str, list[float | None]] = {"latency_ms": [_ms(a.latency) for a in answers]}
        for key in sorted({k for a in answers for k in a.timings}):
            parameters[f"{key}_ms"] = [_ms(a.timings.get(key)) for a in answers]
        outputs = tuple(c for c in columns if not wanted or c.name in wanted)
        response = InferResponse(self.model_name, outputs, parsed.id, "1", parameters)
        body, headers = render_infer_response(response, parsed)
        return Response(body, 200, headers)

    async def predict(self, request: Request) -> Response:
        """``POST /predict``: one image file (the body, or a multipart field) to its answer."""
        data = request.body
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/"):
            data = first_multipart_part(data, content_type)
        if not data:
            raise ProtocolError("empty body; send the image file, e.g. curl --data-binary @image.png")
        (answer,) = await self.submit([parse_image_bytes(data)])
        return Response.json(answer_json(answer))

    # -- the rest --------------------------------------------------------------------------------

    def ready(self, request: Request) -> Response:
        """Ready while an s-CNN worker is up; ``degraded`` when the collage path is down
        (requests are still answered, by the primaries alone)."""
        frontend = self.frontend
        degraded = frontend.mode.collage and not all(p.ready for p in frontend.collage.values())
        return Response.json({"ready": frontend.ready, "degraded": degraded}, 200 if frontend.ready else 503)

    def model_ready(self, request: Request) -> Response:
        self.check_model(request)
        ok = self.frontend.ready
        return Response.json({"name": self.model_name, "ready": ok}, 200 if ok else 503)

    def metadata(self, request: Request) -> Response:
        """The V2 model metadata of the classifier the front end serves."""
        self.check_model(request)
        frontend = self.frontend
        return Response.json(
            {
                "name": self.model_name,
                "versions": ["1"],
                "platform": "collage-inference",
                "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, -1, -1]}],
                "outputs": [
                    {"name": "label", "datatype": "INT64", "shape": [-1]},
                    {"name": "class_name", "datatype": "BYTES", "shape": [-1]},
                    {"name": "confidence", "datatype": "FP32", "shape": [-1]},
                    {"name": "source", "datatype": "BYTES", "shape": [-1]},
                ],
                "parameters": {
                    "mode": frontend.mode.name,
                    "grid": frontend.settings.grid,
                    "labels": list(frontend.class_names),
                    "scnn_workers": len(frontend.scnn),
                    "collage_workers": sum(len(p) for p in frontend.collage.values()),
                    **self._parity_facts(),
                },
            }
        )

    def _parity_facts(self) -> dict[str, Any]:
        """Mode parm's code, so a client can tell which ParM it talks to; nothing in other modes."""
        settings = self.frontend.settings
        if not self.frontend.mode.parity:
            return {}
        return {"parity_k": settings.parity_k, "parity_encoder": settings.parity_encoder}

    def metrics(self, request: Request) -> Response:
        """The Prometheus exposition: the front end's counters and per-worker gauges."""
        return Response(self.exposition.render(), 200, {"Content-Type": Exposition.CONTENT_TYPE})

    def _families(self) -> list[Metric]:
        frontend = self.frontend
        workers = [
            (w.id, w.transport.name, int(w.up), w.outstanding, w.calls)
            for p in frontend.pools
            for w in p.workers
        ]
        return frontend.metrics.families(workers, frontend.in_flight)

    def move_worker(self, request: Request) -> Response:
        """``PUT /admin/workers/{id}`` with ``{"url": ...}``: a worker restarted at a new address."""
        try:
            url = orjson.loads(request.body)["url"]
        except (ValueError, KeyError, TypeError):
            raise ProtocolError('send JSON {"url": "http://HOST:PORT"}') from None
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ProtocolError(f"url must look like http://HOST:PORT, got {url!r}")
        worker_id = request.params["id"]
        old = next((w.transport for p in self.frontend.pools for w in p.workers if w.id == worker_id), None)
        if not isinstance(old, HttpTransport):
            raise ModelNotFoundError(f"no worker {worker_id!r} reached over HTTP")
        self.frontend.replace_transport(worker_id, old.at(url))
        return Response.json({"worker": worker_id, "url": url})


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)


async def _gathered(futures: list[asyncio.Future[Answer]]) -> list[Answer]:
    if len(futures) == 1:  # the common case, without gather's own future
        return [await futures[0]]
    return list(await asyncio.gather(*futures))


async def connect(
    settings: FrontEndSettings,
    scnn: Sequence[WorkerEndpoint],
    collage: Sequence[WorkerEndpoint],
    token: str | None = None,
) -> FrontEnd:
    """A front end over V2 servers at these endpoints."""
    if not scnn:
        raise ConfigError("give at least one s-CNN worker (--scnn URL#MODEL or [[scnn]] tables)")

    def transport(e: WorkerEndpoint) -> HttpTransport:
        return HttpTransport(
            e.url, e.model, token, model_file=e.model_file, facts=e.facts, contract=e.contract
        )

    return await build_frontend(settings, [transport(e) for e in scnn], [transport(e) for e in collage])


async def serve_frontend(config: ServeConfig) -> None:
    """Serve the front end over ``config``'s listed workers until SIGTERM/SIGINT: stop taking
    connections, answer what was accepted, then stop."""
    token = load_token(config.token_file)
    frontend = await connect(config, config.scnn, config.collage, token)
    try:
        await frontend.start()
        router = FrontEndApi(frontend).router(token)
        await serve(router, config.host, config.port, limits=LIMITS, draining=frontend.mark_draining)
        await frontend.drain(timeout=5.0)
    finally:
        await frontend.stop()
        for pool in frontend.pools:
            pool.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="collage frontend", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="a TOML (or JSON) config with [[scnn]] / [[collage]] tables")
    add_frontend_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """``collage frontend``: our errors print one line and exit 2 (3: the port is taken)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s frontend %(levelname)s %(message)s")
    try:
        run(serve_frontend(load_config(args.config, frontend_overrides(args))))
    except ListenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ListenError.exit_code
    except CollageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
