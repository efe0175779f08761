"""The front end as a Ray Serve ingress deployment.

Ray Serve's HTTP proxy hands every request to :meth:`Ingress.__call__` as a Starlette request.
The ingress routes it like serving/api.py's aiohttp app and answers through the same
framework-neutral functions (:func:`~collage_inference.serving.api.infer_payload`,
``predict_payload``, ``model_metadata_doc``, ``metrics_text``, ``error_answer``), over the same
:class:`~collage_inference.serving.frontend.FrontEnd`: one code path for grouping, encoding and
decoding, with :class:`~collage_inference.serving.ray.transport.RayWorker` as the transport.
So ``/v2/...``, ``/predict`` and ``/metrics`` answer alike on both backends, errors included.

Each ingress replica runs its own FrontEnd (its own groups and metrics); one replica, the
default, is what the local backend runs too.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import json
import re
from collections.abc import Coroutine
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from collage_inference.errors import ConfigError, PayloadTooLargeError, ProtocolError, RequestTimeoutError
from collage_inference.serving.api import (
    check_model,
    count_status,
    infer_payload,
    metrics_text,
    model_metadata_doc,
    predict_payload,
    readiness,
)
from collage_inference.serving.dispatch import HEADER_LENGTH, WorkerPool
from collage_inference.serving.frontend import FrontEnd, FrontEndConfig
from collage_inference.serving.http import check_token, error_answer
from collage_inference.serving.protocol import SERVER_METADATA, Limits
from collage_inference.serving.ray.transport import RayWorker

_MODEL_PATH = re.compile(
    r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<action>/ready|/infer)?"
)
_JSON = "application/json; charset=utf-8"
_GET = ("GET", "HEAD")


class _Status(Exception):
    """An answer without a ServingError behind it: unknown path (404) or method (405)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def json_response(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """JSON as aiohttp's ``json_response`` renders it (``json.dumps`` defaults, utf-8)."""
    return Response(json.dumps(doc).encode(), status, headers, media_type=_JSON)


def first_multipart_part(body: bytes, content_type: str) -> bytes:
    """The first part of a multipart body (``curl -F file=@image.png``), as the aiohttp
    handler reads it; the stdlib parser needs no extra package."""
    head = f"Content-Type: {content_type}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    parts = list(message.iter_parts()) if message.is_multipart() else []
    if not parts:
        raise ProtocolError("the multipart body holds no file; send -F file=@image.png")
    return parts[0].get_payload(decode=True) or b""


class Ingress:
    """The front end over the model deployments' handles (see the module docstring)."""

    async def __init__(
        self,
        scnn: Any,
        collage: dict[int, Any],
        config: FrontEndConfig,
        model_name: str = "classifier",
        limits: Limits | None = None,
        app_name: str = "collage",
        token: str | None = None,
    ) -> None:
        self.model_name, self.limits = model_name, limits or Limits(max_body_bytes=16 * 2**20)
        self.token = token  # the shared bearer token; None: open
        self.frontend = await connect(config, scnn, collage, app_name)
        await self.frontend.start()

    async def __call__(self, request: Request) -> Response:
        try:
            check_token(request.url.path, request.headers.get("authorization"), self.token)
            response = await self._route(request)
        except _Status as exc:
            response = json_response({"error": exc.reason}, exc.status)
        except Exception as exc:
            status, body, headers = error_answer(exc, f"{request.method} {request.url.path}")
            response = json_response(body, status, headers)
        count_status(self.frontend, response.status_code)
        return response

    async def _route(self, request: Request) -> Response:
        path, method, frontend = request.url.path, request.method, self.frontend
        if path == "/v2":
            _allow(method, _GET)
            return json_response(SERVER_METADATA)
        if path == "/v2/health/live":
            _allow(method, _GET)
            return json_response({"live": True})
        if path == "/v2/health/ready":
            _allow(method, _GET)
            return json_response(*readiness(frontend))
        if path == "/predict":
            _allow(method, ("POST",))
            body = await self._body(request)
            content_type = request.headers.get("content-type", "")
            if content_type.startswith("multipart/"):
                body = first_multipart_part(body, content_type)
            return json_response(await predict_payload(frontend, body))
        if path == "/metrics":
            _allow(method, _GET)
            return Response(metrics_text(frontend), media_type="text/plain; charset=utf-8")
        match = _MODEL_PATH.fullmatch(path)
        if match is None:
            raise _Status(404, "Not Found")
        action = match["action"]
        _allow(method, ("POST",) if action == "/infer" else _GET)
        check_model(match["name"], self.model_name)
        if action == "/infer":
            body = await self._body(request)
            payload, headers = await infer_payload(
                frontend, self.model_name, self.limits, body, request.headers.get(HEADER_LENGTH)
            )
            return Response(payload, 200, headers)
        if action == "/ready":
            ready = frontend.ready
            return json_response({"name": self.model_name, "ready": ready}, 200 if ready else 503)
        return json_response(model_metadata_doc(frontend, self.model_name))

    async def _body(self, request: Request) -> bytes:
        """The body within the size and time limits (413 / 408), as serving/http.py reads it."""
        limit = self.limits.max_body_bytes
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise PayloadTooLargeError(f"the body of {length} bytes exceeds {limit} bytes")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.limits.body_timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLargeError(f"the body exceeds the limit of {limit} bytes")
                    chunks.append(chunk)
        except TimeoutError:
            raise RequestTimeoutError(
                f"the body took longer than {self.limits.body_timeout:g}s to arrive; send it at once"
            ) from None
        return b"".join(chunks)

    def __del__(self) -> Coroutine[Any, Any, None] | None:
        """Ray Serve awaits this on a graceful stop: answer what was accepted, then stop the
        tasks. Only the first call does it (the garbage collector calls it again later)."""
        frontend = self.__dict__.pop("frontend", None)
        return None if frontend is None else _shutdown(frontend)


async def _shutdown(frontend: FrontEnd) -> None:
    await frontend.drain(timeout=5.0)
    await frontend.stop()


def _allow(method: str, allowed: tuple[str, ...]) -> None:
    if method not in allowed:
        raise _Status(405, "Method Not Allowed")


async def connect(config: FrontEndConfig, scnn: Any, collage: dict[int, Any], app_name: str) -> FrontEnd:
    """Describe the deployments behind the handles and build the front end over them
    (serving/api.py's ``connect``, for handles instead of URLs)."""
    scnn_worker = RayWorker("scnn", scnn, app_name)
    collage_workers = {grid: RayWorker(f"collage-{grid}x{grid}", h, app_name) for grid, h in collage.items()}
    workers = [scnn_worker, *collage_workers.values()]
    infos = await asyncio.gather(*(w.describe() for w in workers))
    scnn_info, class_names = infos[0], infos[0].labels
    if scnn_info.kind != "scnn":
        raise ConfigError(f"deployment scnn serves {scnn_info.kind} {scnn_info.model}, not an s-CNN")
    tiles: dict[int, int] = {}
    for (grid, worker), info in zip(collage_workers.items(), infos[1:], strict=True):
        if info.kind != "collage" or info.grid != grid or info.labels[: len(class_names)] != class_names:
            raise ConfigError(f"deployment {worker.id} serves {info.kind} {info.model}, not its collage")
        tiles[grid] = info.image_size
    pools = {grid: WorkerPool([w]) for grid, w in collage_workers.items()}
    return FrontEnd(config, WorkerPool([scnn_worker]), pools, class_names, tiles, scnn_info.channels)
