"""How every server of the project listens: a lean front door for the inference endpoint,
aiohttp for everything else, and a graceful stop.

Every request a front end admits is one inference call in and at least one out, so on a small
machine the HTTP server's CPU per request is latency. aiohttp's server is general (routing,
middlewares, request objects, streaming bodies) and that generality costs about as much CPU as
a worker's model. An inference call needs far less: a POST with a ``Content-Length`` body,
answered with one write.

So every connection starts on a :class:`_Connection` of the :class:`FrontDoor`. It reads each
request head within a deadline (a client trickling its head or body gets 408, so it cannot
hold a socket). A POST to one of the app's :class:`FastRoutes` with a ``Content-Length`` body,
the shape every V2 client sends, is answered right here: body size and time limits, the shared
token, the handler, one write. Anything else (another path or method, a chunked body,
``Expect: 100-continue``, HTTP/1.0, an upgrade, a malformed head) hands the connection, with
the bytes read so far, to aiohttp's protocol, which serves it from then on. Both answer errors
through :func:`~collage_inference.serving.http.error_answer`, so a client cannot tell them
apart. Requests on one connection are answered in order, one at a time, as HTTP/1.1 wants.

:func:`serve_app` runs an app this way until SIGTERM or SIGINT and prints
``ready on http://HOST:PORT`` once listening, the line launchers wait for.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import inspect
import json
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from types import MappingProxyType
from typing import cast

from aiohttp import web

from collage_inference.errors import (
    ConfigError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ServingError,
)
from collage_inference.serving.http import check_token, error_answer
from collage_inference.serving.kept import Kept
from collage_inference.serving.protocol import Limits

READY_PREFIX = "ready on "
MAX_HEAD_BYTES = 16 * 2**10
KEEPALIVE_S = 30.0  # idle keep-alive connections do not hold sockets for ever
MAX_KEPT_HEADS = 256

Payload = tuple[bytes, dict[str, str]]  # an answer's body and headers
# (body, headers with lower-case names) -> the answer, at once or later; raises to refuse.
FastHandler = Callable[[bytes, Mapping[str, str]], Payload | Awaitable[Payload]]


@dataclass(frozen=True)
class FastRoutes:
    """The POST endpoints the front door answers itself: exact path -> handler.

    ``on_status`` sees the status of every answer (the front end counts refused requests).
    """

    handlers: Mapping[str, FastHandler]
    limits: Limits
    token: str | None = None
    on_status: Callable[[int], None] | None = None


FAST_ROUTES = web.AppKey("fast_routes", FastRoutes)
_NO_ROUTES = FastRoutes({}, Limits())


class FrontDoor:
    """The listening protocol factory: lean connections, handed to ``fallback`` when needed."""

    def __init__(self, fallback: Callable[[], asyncio.Protocol], routes: FastRoutes = _NO_ROUTES) -> None:
        self.fallback = fallback
        self.routes = routes
        self.connections: set[_Connection] = set()
        self.closing = False
        # Clients send the same head with every request of a size (same path, same headers), so
        # a parsed head is kept, keyed by its bytes, and a repeated one is not parsed again.
        self.heads: Kept[bytes, tuple[str, Mapping[str, str], int]] = Kept(MAX_KEPT_HEADS)

    def __call__(self) -> asyncio.Protocol:
        return _Connection(self)

    async def shutdown(self, timeout: float) -> None:
        """Close idle connections now; give answers in progress up to ``timeout`` seconds."""
        self.closing = True
        answering = [c.answering for c in self.connections if c.answering is not None]
        for connection in list(self.connections):
            if connection.answering is None:
                connection.close()
        if answering:
            await asyncio.wait(answering, timeout=timeout)
        for connection in list(self.connections):
            connection.close()


class _Connection(asyncio.Protocol):
    """One client connection while the front door serves it."""

    def __init__(self, door: FrontDoor) -> None:
        # Kept: on Python 3.11 every get_running_loop() is a getpid() system call.
        self.loop = asyncio.get_running_loop()
        self.door = door
        self.routes = door.routes
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.answering: asyncio.Task[None] | None = None  # the handler of the request in progress
        self.close_after = False  # the client asked to close, or sent EOF: no request after this
        self.write_paused = False
        # The deadline of a request being read, and the keep-alive check. The check is not
        # re-armed on every request (a cancelled and a new timer each time): it looks every
        # KEEPALIVE_S or so and closes a connection that has been idle that long.
        self._deadline: asyncio.TimerHandle | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self.idle_since = 0.0  # loop time when the connection last ran out of work

    # -- asyncio callbacks --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio subclasses
        self.door.connections.add(self)
        self.idle_since = self.loop.time()
        self._keepalive = self.loop.call_later(KEEPALIVE_S, self._check_idle)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.answering is None:
            self._next()
        elif len(self.buffer) > self.routes.limits.max_body_bytes + MAX_HEAD_BYTES:
            self.transport.pause_reading()  # a client pipelining faster than it is answered

    def eof_received(self) -> bool:
        self.close_after = True
        return self.answering is not None  # keep the transport open to write that answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.door.connections.discard(self)
        self._cancel_timers()
        self.transport = None

    def pause_writing(self) -> None:
        self.write_paused = True  # a client that does not read: stop answering its requests

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.answering is None:
            self._next()

    def close(self) -> None:
        self._cancel_timers()
        transport, self.transport = self.transport, None
        if transport is not None:
            transport.close()

    # -- reading requests ---------------------------------------------------------------------

    def _next(self) -> None:
        """Answer the requests in the buffer, in order, until one has to wait (for bytes or for
        its handler), or the connection is handed off or closed."""
        while self.answering is None and self.transport is not None and not self.write_paused:
            request = self._take_request()
            if request is None:
                return
            path, body, headers = request
            try:
                check_token(path, headers.get("authorization"), self.routes.token)
                outcome = self.routes.handlers[path](body, headers)
            except Exception as exc:
                outcome = exc
            if inspect.isawaitable(outcome):
                self.answering = self.loop.create_task(self._answer_later(f"POST {path}", outcome))
                return
            self._send(f"POST {path}", outcome)

    def _take_request(self) -> tuple[str, bytes, Mapping[str, str]] | None:
        """The next whole request for a fast route, taken from the buffer; None when there is
        none to answer now (bytes still to come, the connection handed off, or refused)."""
        buffer = self.buffer
        if not buffer:
            if self.close_after or self.door.closing:
                self.close()
            else:
                self.idle_since = self.loop.time()
            return None
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_HEAD_BYTES:
                self._hand_off()  # aiohttp refuses oversized heads with its own 431/400
            else:
                self._start_request_deadline()
            return None
        head = bytes(buffer[:end])
        fast = self.door.heads.get(head)
        if fast is None:
            fast = self._fast_request(head)
            if fast is None:
                self._hand_off()
                return None
            self.door.heads.keep(head, fast)
        path, headers, length = fast
        if length > self.routes.limits.max_body_bytes:
            limit = self.routes.limits.max_body_bytes
            self._refuse(PayloadTooLargeError(f"the body of {length} bytes exceeds {limit} bytes"))
            return None
        start = end + 4
        if len(buffer) < start + length:
            self._start_request_deadline()
            return None
        body = bytes(buffer[start : start + length])
        del buffer[: start + length]
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if headers.get("connection", "").lower() == "close":
            self.close_after = True
        return path, body, headers

    def _fast_request(self, head: bytes) -> tuple[str, Mapping[str, str], int] | None:
        """(path, headers, body length) of a request the front door answers, else None."""
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or parts[0] != "POST" or parts[2] != "HTTP/1.1":
            return None
        path = parts[1]
        if path not in self.routes.handlers:
            return None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            name = name.lower()
            if not sep or not name or name != name.strip() or name in headers:
                return None  # malformed or repeated: aiohttp's strict parser says what is wrong
            headers[name] = value.strip()
        length = headers.get("content-length", "")
        if (
            not length.isdigit()
            or not length.isascii()
            or {"transfer-encoding", "expect", "upgrade"} & headers.keys()
        ):
            return None
        return path, MappingProxyType(headers), int(length)  # shared by repeats of this head

    def _hand_off(self) -> None:
        """aiohttp serves this connection from now on, starting with the bytes read so far."""
        transport = self.transport
        assert transport is not None
        self._cancel_timers()
        self.door.connections.discard(self)
        self.transport = None
        protocol = self.door.fallback()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if not transport.is_reading():
            transport.resume_reading()
        if self.buffer:
            protocol.data_received(bytes(self.buffer))

    # -- answering ----------------------------------------------------------------------------

    async def _answer_later(self, what: str, pending: Awaitable[Payload]) -> None:
        try:
            outcome: Payload | Exception = await pending
        except Exception as exc:
            outcome = exc
        self.answering = None
        self._send(what, outcome)
        self._next()

    def _send(self, what: str, outcome: Payload | Exception) -> None:
        """Write the answer to ``what`` (a payload, or the failure that replaces it) in one write."""
        if isinstance(outcome, Exception):
            status, doc, headers = error_answer(outcome, what)
            payload = json.dumps(doc).encode()
            headers["Content-Type"] = "application/json; charset=utf-8"
        else:
            status, (payload, headers) = 200, outcome
        if self.routes.on_status is not None:
            self.routes.on_status(status)
        if self.transport is None:
            return  # the client went away; the request was still carried out
        self.close_after |= self.door.closing
        self.transport.write(render_answer(status, headers, payload, self.close_after))
        if self.close_after:
            self.close()
        elif not self.transport.is_reading():
            self.transport.resume_reading()

    def _refuse(self, error: ServingError) -> None:
        """Answer ``error`` and close: the rest of the request is not worth reading."""
        self.close_after = True
        self._send("a request", error)

    # -- deadlines ----------------------------------------------------------------------------

    def _start_request_deadline(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.routes.limits.body_timeout, self._request_timeout)

    def _request_timeout(self) -> None:
        self._deadline = None
        seconds = f"{self.routes.limits.body_timeout:g}s"
        if self.buffer.find(b"\r\n\r\n") < 0:
            self._refuse(RequestTimeoutError(f"the request head took longer than {seconds} to arrive"))
        else:
            self._refuse(
                RequestTimeoutError(f"the body took longer than {seconds} to arrive; send it at once")
            )

    def _check_idle(self) -> None:
        """Close the connection if it has been idle for KEEPALIVE_S; else look again when it
        could have been."""
        idle = self.loop.time() - self.idle_since if self.answering is None and not self.buffer else 0.0
        if idle >= KEEPALIVE_S:
            self._keepalive = None
            self.close()
        else:
            self._keepalive = self.loop.call_later(KEEPALIVE_S - idle, self._check_idle)

    def _cancel_timers(self) -> None:
        for timer in (self._deadline, self._keepalive):
            if timer is not None:
                timer.cancel()
        self._deadline = self._keepalive = None


_date = (0, "")


def _http_date() -> str:
    """The ``Date`` header value, formatted once a second."""
    global _date
    now = int(time.time())
    if now != _date[0]:
        _date = (now, formatdate(now, usegmt=True))
    return _date[1]


@functools.cache
def _status_line(status: int) -> str:
    return f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"


def render_answer(status: int, headers: Mapping[str, str], body: bytes, close: bool = False) -> bytes:
    """A whole HTTP/1.1 answer, head and body, to be sent with one write."""
    lines = [
        _status_line(status),
        f"Content-Length: {len(body)}",
        f"Date: {_http_date()}",
        "Server: collage-inference",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def serve_app(app: web.Application, host: str, port: int, shutdown_timeout: float = 5.0) -> None:
    """Serve ``app`` until SIGTERM/SIGINT; port 0 picks a free port, printed in the ready line.

    The app's :data:`FAST_ROUTES`, if set, are answered by the front door. On the signal the
    listening socket closes first, then requests in flight get up to ``shutdown_timeout``
    seconds to finish (the app's cleanup drains its own work), so a graceful stop answers what
    it accepted.
    """
    # Everything built so far (modules, models, metadata) lives as long as the server: freeze it
    # out of the collector's view, and collect the young generation less often, so that the
    # per-request garbage collections stay short and rare (they show in the tail).
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 100)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=shutdown_timeout,
        keepalive_timeout=KEEPALIVE_S,
    )
    await runner.setup()
    assert runner.server is not None
    door = FrontDoor(runner.server, app.get(FAST_ROUTES, _NO_ROUTES))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    listener: asyncio.Server | None = None
    try:
        try:
            listener = await loop.create_server(door, host, port, reuse_address=True)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}; pick another --port") from exc
        bound_port = listener.sockets[0].getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        print(f"{READY_PREFIX}http://{shown}:{bound_port}", flush=True)
        await stop.wait()
    finally:
        if listener is not None:
            listener.close()
        await door.shutdown(shutdown_timeout)
        await runner.cleanup()
