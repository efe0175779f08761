"""What every HTTP server of the project shares: errors, the shared token, bodies, the run loop.

:func:`error_answer` is the single place where exceptions become HTTP answers
(``{"error": message}`` with the status the :class:`ServingError` subclass names, and a
``Retry-After`` on 429 and 503), so a bad request never takes a server down; aiohttp apps apply
it through :func:`error_middleware`, the front door and the Ray Serve ingress call it directly.
:func:`auth_middleware` guards a server with an optional shared bearer token.
:func:`read_body` reads a request body within a size and a time limit, so neither a huge nor a
slow client can hold a server's memory or its sockets. :func:`run` runs a server's (or a
client's) main coroutine on uvloop where it is installed. How servers listen is
:mod:`~collage_inference.serving.server`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from collage_inference.errors import (
    CollageError,
    ConfigError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ServingError,
    UnauthorizedError,
)
from collage_inference.serving.protocol import Limits

log = logging.getLogger("collage_inference.serving")
T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
TOKEN_ENV = "COLLAGE_TOKEN"
RETRY_AFTER_S = "1"
# Orchestrators probe liveness and readiness without credentials; they reveal nothing.
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})


def error_answer(exc: Exception, what: str = "a request") -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, JSON body and headers that answer a failure: the one mapping, for aiohttp
    (:func:`error_middleware`) and for servers outside it (the front door, the Ray Serve ingress)."""
    headers: dict[str, str] = {}
    if isinstance(exc, ServingError):
        status, message = exc.status, str(exc)
    elif isinstance(exc, CollageError):
        log.error("request failed: %s", exc)
        status, message = 500, str(exc)
    else:
        log.error("unexpected error serving %s", what, exc_info=exc)
        status, message = 500, "internal error; see the server log"
    if status in (429, 503):
        headers["Retry-After"] = RETRY_AFTER_S
    elif status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="collage-inference"'
    return status, {"error": message}, headers


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Convert every failure into a JSON error answer with the right status."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return web.json_response({"error": exc.reason}, status=exc.status)
    except Exception as exc:
        status, body, headers = error_answer(exc, f"{request.method} {request.path}")
        return web.json_response(body, status=status, headers=headers)


def check_token(path: str, authorization: str | None, token: str | None) -> None:
    """Raise 401 unless ``token`` is unset, ``path`` is a health check, or the Authorization
    header is ``Bearer <token>``.

    The comparison takes constant time, so response timing does not reveal how much of a
    guess was right; neither the token nor the header sent is ever logged.
    """
    if token is None or path in OPEN_PATHS:
        return
    if not hmac.compare_digest((authorization or "").encode(), f"Bearer {token}".encode()):
        raise UnauthorizedError(
            "missing or wrong bearer token; send the header 'Authorization: Bearer <token>' "
            f"with the token the server was started with (${TOKEN_ENV} or --token-file)"
        )


def auth_middleware(token: str) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """Refuse (401) every request but the health checks unless it carries the shared token."""

    @web.middleware
    async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        check_token(request.path, request.headers.get("Authorization"), token)
        return await handler(request)

    return require_token


def load_token(token_file: Path | str | None = None) -> str | None:
    """The shared token: from ``token_file`` if given, else ``$COLLAGE_TOKEN``; None if neither.

    Never from a command-line value: arguments are visible to every user in ``ps``.
    """
    if token_file is not None:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the token file {token_file}: {exc.strerror}") from exc
        if not token:
            raise ConfigError(f"the token file {token_file} is empty; put the shared token in it")
    else:
        token = os.environ.get(TOKEN_ENV) or ""
    if any(c.isspace() or not c.isprintable() for c in token):
        where = token_file or f"${TOKEN_ENV}"
        raise ConfigError(f"the token in {where} holds spaces or control characters; use one word")
    return token or None


def server_middlewares(token: str | None) -> list:
    """The middlewares of every server: errors outermost, so a refused token is a JSON 401."""
    return [error_middleware, *([auth_middleware(token)] if token else [])]


async def read_body(request: web.Request, limits: Limits) -> bytes:
    """The request body, refused with 413 past ``max_body_bytes`` and 408 past ``body_timeout``."""
    limit = limits.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLargeError(f"the body of {request.content_length} bytes exceeds {limit} bytes")
    try:
        async with asyncio.timeout(limits.body_timeout):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLargeError(f"the body exceeds the limit of {limit} bytes") from None
    except TimeoutError:
        raise RequestTimeoutError(
            f"the body took longer than {limits.body_timeout:g}s to arrive; send it at once"
        ) from None


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop where it is installed (its event loop and transports are in C:
    less CPU per request, which on a small machine is latency), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
