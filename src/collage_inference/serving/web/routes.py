"""Requests, responses, the route table and the one mapping from failures to HTTP answers.

A service declares its endpoints once, as data: a :class:`Router` built from :class:`Route`
entries. Whatever serves them (the HTTP server of :mod:`.server`, the Ray Serve ingress, a test
calling :meth:`Router.handle` directly) sees the same table, the same token check and the same
error answers, so a client cannot tell one entry point from another.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import os
import re
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol, TypeVar

import orjson

from collage_inference.errors import (
    CollageError,
    ConfigError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    ServingError,
    UnauthorizedError,
)

log = logging.getLogger("collage_inference.serving")
T = TypeVar("T")
TOKEN_ENV = "COLLAGE_TOKEN"
RETRY_AFTER_S = "1"
# Orchestrators probe liveness and readiness without credentials; they reveal nothing.
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH"})
_JSON = MappingProxyType({"Content-Type": "application/json"})


class BodyBuffer:
    """A request body read piece by piece under its size limit: the one place where a body's
    size is checked, for the HTTP server and the Ray Serve ingress alike."""

    __slots__ = ("limit", "size", "_parts")

    def __init__(self, limit: int, declared: int | None = None) -> None:
        """``declared``: the Content-Length, refused at once when it exceeds ``limit``."""
        if declared is not None and declared > limit:
            raise PayloadTooLargeError(f"the body of {declared} bytes exceeds {limit} bytes")
        self.limit, self.size = limit, 0
        self._parts: list[bytes] = []

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise PayloadTooLargeError(f"the body exceeds the limit of {self.limit} bytes")
        if chunk:
            self._parts.append(chunk)

    def bytes(self) -> bytes:
        return b"".join(self._parts)  # a body that came in one piece is that piece, not a copy


def add_header(headers: dict[str, str], name: bytes, value: bytes) -> None:
    """Add a header as llhttp reads it: the name in lower case, a repeated header's values
    joined with ``", "``."""
    key, text = name.decode("latin-1").lower(), value.decode("latin-1")
    seen = headers.setdefault(key, text)
    if seen is not text:
        headers[key] = f"{seen}, {text}"


@dataclass(frozen=True, slots=True, eq=False)
class Request:
    """One whole request, body read within the limits. ``path`` is as sent (no percent-decoding),
    without the query string; headers as :func:`add_header` keeps them; ``params`` holds the
    values of the route's ``{param}`` segments."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    body: bytes
    params: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, eq=False)
class Response:
    """An answer. The server adds Content-Length, Date, Server and, when it closes, Connection."""

    body: bytes = b""
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, doc: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
        """``doc`` as JSON (orjson: numpy arrays and dataclasses too)."""
        body = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
        return cls(body, status, _JSON if headers is None else {**_JSON, **headers})

    @classmethod
    def text(cls, text: str, status: int = 200, content_type: str = "text/plain; charset=utf-8") -> Response:
        return cls(text.encode(), status, {"Content-Type": content_type})


Handler = Callable[[Request], Response | Awaitable[Response]]


@dataclass(frozen=True)
class Route:
    """``method`` (a GET route answers HEAD too) on ``path``, whose segments are literal or a
    whole ``{param}`` each, as in ``/v2/models/{name}/infer``."""

    method: str
    path: str
    handler: Handler


_Table = dict[str, Handler]  # method -> handler, for one path


class ModelService(Protocol):
    """The handlers of a service that serves one model over V2 (the front end's and the worker's)."""

    def ready(self, request: Request) -> Response | Awaitable[Response]: ...
    def metadata(self, request: Request) -> Response | Awaitable[Response]: ...
    def model_ready(self, request: Request) -> Response | Awaitable[Response]: ...
    def infer(self, request: Request) -> Response | Awaitable[Response]: ...
    def metrics(self, request: Request) -> Response | Awaitable[Response]: ...


def model_routes(
    model: str, version: str, service: ModelService, server_metadata: Mapping[str, Any]
) -> list[Route]:
    """The Open Inference Protocol (KServe V2) endpoints of a service that serves ``model``:
    health, server metadata, ``/metrics``, and each model path with and without
    ``/versions/{version}``. The served model's infer paths are declared literally too: an
    exact path is a dict lookup, where a ``{name}`` pattern is a regular expression run on every
    request."""
    routes = [
        Route("GET", "/v2", lambda r: Response.json(server_metadata)),
        Route("GET", "/v2/health/live", lambda r: Response.json({"live": True})),
        Route("GET", "/v2/health/ready", service.ready),
        Route("GET", "/metrics", service.metrics),
    ]
    infer = service.infer
    routes += [Route("POST", f"/v2/models/{model}{v}/infer", infer) for v in ("", f"/versions/{version}")]
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        routes += [
            Route("GET", prefix, service.metadata),
            Route("GET", prefix + "/ready", service.model_ready),
            Route("POST", prefix + "/infer", infer),
        ]
    return routes


class Router:
    """One service's endpoints, declared once as data; every entry point serves this table.

    Exact paths are looked up in a dict; paths with ``{param}`` segments are matched after, in
    declaration order, by precompiled patterns. ``on_status`` sees the status of every answer,
    refusals included (a service counts them).
    """

    def __init__(
        self,
        routes: Iterable[Route],
        *,
        token: str | None = None,
        on_status: Callable[[int], None] | None = None,
    ) -> None:
        self._token = token
        self._on_status: Callable[[int], None] = on_status or (lambda status: None)
        self._exact: dict[str, _Table] = {}
        patterns: dict[str, _Table] = {}
        for route in routes:
            if route.method not in METHODS:
                raise ConfigError(f"route {route.path}: {route.method!r} is not one of {sorted(METHODS)}")
            table = (patterns if "{" in route.path else self._exact).setdefault(route.path, {})
            if route.method in table:
                raise ConfigError(f"route {route.method} {route.path} is declared twice")
            table[route.method] = route.handler
        for table in (*self._exact.values(), *patterns.values()):
            if "GET" in table:
                table["HEAD"] = table["GET"]  # the server sends the head of the GET answer only
        self._patterns = [(_compile(path), table) for path, table in patterns.items()]

    def handle(self, request: Request) -> Response | Awaitable[Response]:
        """The answer to ``request``; never raises, every failure is an error answer. A handler
        that answers at once is answered at once, without a coroutine or a task (a worker
        answers small batches inline); an awaitable comes back as one coroutine."""
        try:
            if self._token is not None:
                check_token(request.path, request.headers.get("authorization"), self._token)
            table = self._exact.get(request.path)
            if table is None:
                table, request = self._match(request)
            handler = table.get(request.method)
            if handler is None:
                allow = ", ".join(sorted(table))
                error = MethodNotAllowedError(f"{request.method} is not allowed on {request.path}: {allow}")
                response = self.error(error, f"{request.method} {request.path}")
                return Response(response.body, response.status, {**response.headers, "Allow": allow})
            result = handler(request)
        except Exception as exc:
            return self.error(exc, f"{request.method} {request.path}")
        if isinstance(result, Response):
            self._on_status(result.status)
            return result
        return self._later(result, request)

    def error(self, exc: BaseException, what: str) -> Response:
        """The error answer to ``exc``, counted like every answer; servers answer their own
        refusals (bad framing, limits, timeouts) through it."""
        response = error_response(exc, what)
        self._on_status(response.status)
        return response

    async def _later(self, pending: Awaitable[Response], request: Request) -> Response:
        try:
            response = await pending
            if not isinstance(response, Response):
                raise TypeError(f"the handler of {request.path} answered {type(response).__name__}")
        except Exception as exc:
            return self.error(exc, f"{request.method} {request.path}")
        self._on_status(response.status)
        return response

    def _match(self, request: Request) -> tuple[_Table, Request]:
        for pattern, table in self._patterns:
            found = pattern.fullmatch(request.path)
            if found is not None:
                r, params = request, found.groupdict()
                return table, Request(r.method, r.path, r.query, r.headers, r.body, params)
        raise NotFoundError(f"no endpoint at {request.path}")


def _compile(path: str) -> re.Pattern[str]:
    """The pattern of a route path: a ``{name}`` segment matches one non-empty segment."""
    parts = []
    for segment in path.split("/"):
        if segment.startswith("{") and segment.endswith("}") and segment[1:-1].isidentifier():
            parts.append(f"(?P<{segment[1:-1]}>[^/]+)")
        elif "{" in segment or "}" in segment:
            raise ConfigError(f"route {path}: a parameter must be a whole segment, as in /models/{{name}}")
        else:
            parts.append(re.escape(segment))
    return re.compile("/".join(parts))


def error_response(exc: BaseException, what: str = "a request") -> Response:
    """The answer to a failure, ``{"error": message}``: the one mapping, for every entry point.

    A :class:`ServingError` answers its own status (with ``Retry-After`` on 429 and 503); another
    :class:`CollageError` is a 500 with its message, logged; anything else is a bug: a 500 that
    reveals nothing, logged with its traceback."""
    headers = dict(_JSON)
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
        # Basic too: a browser opening /dashboard asks for it (the token is the password)
        headers["WWW-Authenticate"] = 'Bearer realm="collage-inference", Basic realm="collage-inference"'
    return Response(orjson.dumps({"error": message}), status, headers)


def check_token(path: str, authorization: str | None, token: str | None) -> None:
    """Raise 401 unless ``token`` is unset, ``path`` is a health check, or the Authorization
    header is ``Bearer <token>`` (or HTTP Basic with the token as password, what a browser sends).

    The comparison takes constant time, so response timing does not reveal how much of a
    guess was right; neither the token nor the header sent is ever logged.
    """
    if token is None or path in OPEN_PATHS:
        return
    sent = (authorization or "").encode()
    if sent[:6].lower() == b"basic ":
        try:
            sent = b"Bearer " + base64.b64decode(sent[6:].strip(), validate=True).partition(b":")[2]
        except (binascii.Error, ValueError):
            sent = b""
    if not hmac.compare_digest(sent, f"Bearer {token}".encode()):
        raise UnauthorizedError(
            "missing or wrong bearer token; send the header 'Authorization: Bearer <token>' "
            f"with the token the server was started with (${TOKEN_ENV} or --token-file)"
        )


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


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop where it is installed (its event loop and transports are in C:
    less CPU per request, which on a small machine is latency), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        uvloop = None  # and not run ``main`` inside this handler: its errors would chain to it
    return asyncio.run(main) if uvloop is None else uvloop.run(main)
