"""The front end as a Ray Serve ingress deployment.

Ray Serve's HTTP proxy hands every request to :meth:`Ingress.__call__` as a Starlette request.
The ingress reads its body under the same limits as the project's own server, turns it into a
:class:`~collage_inference.serving.web.routes.Request` and hands it to the front end's one route
table (:class:`~collage_inference.serving.api.FrontEndApi`), over the same
:class:`~collage_inference.serving.frontend.FrontEnd` with
:class:`~collage_inference.serving.transports.ray.RayTransport` as the transport. So every
endpoint, error and status answers alike on both backends.

Each ingress replica runs its own FrontEnd (its own groups and metrics); one replica, the
default, is what the local backend runs too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from starlette.requests import Request as StarletteRequest
from starlette.responses import Response as StarletteResponse

from collage_inference.config import ServeConfig
from collage_inference.errors import RequestTimeoutError
from collage_inference.serving.api import LIMITS, FrontEndApi
from collage_inference.serving.frontend import FrontEnd, build_frontend
from collage_inference.serving.transports.ray import RayTransport
from collage_inference.serving.web.routes import BodyBuffer, Request, Response


class Ingress:
    """The front end over the model deployments' handles (see the module docstring)."""

    async def __init__(
        self, scnn: Any, collage: dict[int, Any], config: ServeConfig, token: str | None = None
    ) -> None:
        app = config.ray.app_name
        self.frontend = await build_frontend(
            config.frontend_settings(),
            [RayTransport(scnn, app)],
            [RayTransport(handle, app) for _, handle in sorted(collage.items())],
        )
        await self.frontend.start()
        self.router = FrontEndApi(self.frontend).router(token)

    async def __call__(self, request: StarletteRequest) -> StarletteResponse:
        what = f"{request.method} {request.url.path}"
        try:
            body = await _read_body(request)
        except Exception as exc:
            response = self.router.error(exc, what)  # counted as the server counts its refusals
        else:
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in request.headers.raw}
            ours = Request(request.method, request.url.path, request.url.query, headers, body)
            answer = self.router.handle(ours)
            response = answer if isinstance(answer, Response) else await answer
        return StarletteResponse(response.body, response.status, dict(response.headers))

    def __del__(self) -> Coroutine[Any, Any, None] | None:
        """Ray Serve awaits this on a graceful stop: answer what was accepted, then stop the
        tasks. Only the first call does it (the garbage collector calls it again later)."""
        frontend = self.__dict__.pop("frontend", None)
        return None if frontend is None else _shutdown(frontend)


async def _read_body(request: StarletteRequest) -> bytes:
    """The body within the front end's size and time limits (413 / 408)."""
    length = request.headers.get("content-length")
    body = BodyBuffer(LIMITS.max_body_bytes, int(length) if length and length.isdigit() else None)
    try:
        async with asyncio.timeout(LIMITS.body_timeout):
            async for chunk in request.stream():
                body.add(chunk)
    except TimeoutError:
        raise RequestTimeoutError(
            f"the body took longer than {LIMITS.body_timeout:g}s to arrive; send it at once"
        ) from None
    return body.bytes()


async def _shutdown(frontend: FrontEnd) -> None:
    await frontend.drain(timeout=5.0)
    await frontend.stop()
