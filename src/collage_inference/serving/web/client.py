"""The one HTTP/1.1 client of the project: worker calls, readiness probes, metadata.

A call is one write over a keep-alive connection from a per-origin pool, its answer framed by
llhttp (Content-Length, chunked, or until the server closes). On an idle connection a request
is written before :meth:`HttpClient.request` returns, so the server is at work while the
caller's task gets scheduled. A request that fails on a reused connection before any byte of
the answer arrived is sent once more on a new connection: the server may have closed the idle
connection just as we wrote to it (a keep-alive race every HTTP client has to handle). The
calls sent are pure functions of their input, so sending one twice is harmless.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import orjson
from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from collage_inference.errors import ConfigError, ProtocolError
from collage_inference.serving.web.routes import add_header

MAX_IDLE = 256  # idle connections kept per origin


@dataclass(frozen=True, slots=True, eq=False)
class HttpReply:
    """An answer: its status, its headers (names in lower case) and its whole body."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON; ProtocolError if it is not JSON."""
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError as exc:
            raise ProtocolError(f"the answer is not JSON: {exc}; body {self.body[:100]!r}") from None


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time. The parser calls the ``on_*``
    methods as it frames the answer."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.parser = HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False  # taken from the idle pool: a failure may be a stale keep-alive
        self.received = False  # a byte of the answer arrived
        self.head_only = False  # the answer to HEAD: no body follows its head
        self.until_eof = False  # a body without a length: it ends when the server closes
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self._waiter: asyncio.Future[HttpReply] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio subclasses

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            self.close()  # bytes nobody asked for: the connection cannot be trusted any more
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except (HttpParserError, HttpParserUpgrade) as exc:  # an upgrade is not what was asked
            self._finish(ProtocolError(f"malformed answer: {exc!r}"))
            self.close()

    def eof_received(self) -> bool:
        if self.until_eof:
            self._finish(HttpReply(self.parser.get_status_code(), self.headers, bytes(self.body)))
        self.connection_lost(ConnectionResetError("the server closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._finish(exc or ConnectionResetError("the connection was lost"))

    def on_header(self, name: bytes, value: bytes) -> None:
        add_header(self.headers, name, value)

    def on_headers_complete(self) -> None:
        if self._waiter is None:
            raise ProtocolError("an answer nobody asked for")  # the connection cannot be trusted
        self.until_eof = "content-length" not in self.headers and "transfer-encoding" not in self.headers
        if self.head_only:
            self.closed = True  # the parser would wait for a body: this connection is done
            self._finish(HttpReply(self.parser.get_status_code(), self.headers, b""))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:  # an interim answer (100 Continue): the real one follows
            self.headers = {}
            return
        self.until_eof = False
        self.closed = self.closed or not self.parser.should_keep_alive()
        self._finish(HttpReply(status, self.headers, bytes(self.body)))

    def send(self, data: bytes, deadline: float, head_only: bool) -> asyncio.Future[HttpReply]:
        """Write the request now; the future resolves with its answer, or fails with
        TimeoutError at ``deadline`` (loop time)."""
        assert self.transport is not None
        self.received = self.until_eof = False
        self.head_only = head_only
        self.headers = {}
        self.body = bytearray()
        self._waiter = self.loop.create_future()
        self._timer = self.loop.call_at(deadline, self._time_out)
        self.transport.write(data)
        return self._waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _time_out(self) -> None:
        self._timer = None
        self._finish(TimeoutError("no answer before the deadline"))
        self.close()  # mid-answer: unusable

    def _finish(self, result: HttpReply | BaseException) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(result) if isinstance(result, BaseException) else waiter.set_result(result)


class HttpClient:
    """Keep-alive HTTP/1.1 to one origin: ``http://host:port`` or ``https://...``, with an
    optional base path that every request's path is appended to."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ConfigError(f"{url!r} is not an http:// or https:// URL (http://host:port[/path])")
        try:
            self.port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise ConfigError(f"{url!r} has a bad port; give one in 1..65535") from None
        self.host = parts.hostname
        self.base = parts.path.rstrip("/")
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._host_header = parts.netloc.rpartition("@")[2]
        self._idle: list[_Connection] = []

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        timeout: float = 5.0,
    ) -> Awaitable[HttpReply]:
        """Send ``method`` to ``path`` (after the URL's base path), written now when a
        keep-alive connection is idle; the awaitable raises OSError, TimeoutError or
        ProtocolError on failure."""
        head = self.head(method, path, headers or {}, len(body))
        return self._send(head + body, timeout, method == "HEAD")

    def head(self, method: str, path: str, headers: Mapping[str, str], length: int) -> bytes:
        """The head of a request with ``length`` body bytes. A caller that sends many requests
        of one shape renders it once and passes it, with each body, to :meth:`send`."""
        head = f"{method} {self.base}{path} HTTP/1.1\r\nHost: {self._host_header}\r\n"
        head += f"Content-Length: {length}\r\n"
        for name, value in headers.items():
            head += f"{name}: {value}\r\n"
        return (head + "\r\n").encode("latin-1")

    def send(self, data: bytes, timeout: float) -> Awaitable[HttpReply]:
        """Send a whole request, head (as :meth:`head` renders it) and body; as :meth:`request`."""
        return self._send(data, timeout, False)

    def close(self) -> None:
        """Close the idle connections (requests in flight finish on theirs)."""
        for connection in self._idle:
            connection.close()
        self._idle.clear()

    def _send(self, data: bytes, timeout: float, head_only: bool) -> Awaitable[HttpReply]:
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                connection.reused = True
                deadline = connection.loop.time() + timeout
                sent = connection.send(data, deadline, head_only)
                return self._exchange(data, connection, sent, deadline, head_only)
        deadline = asyncio.get_running_loop().time() + timeout
        return self._exchange(data, None, None, deadline, head_only)

    async def _exchange(
        self,
        data: bytes,
        connection: _Connection | None,
        sent: asyncio.Future[HttpReply] | None,
        deadline: float,
        head_only: bool,
    ) -> HttpReply:
        # The whole exchange, retry included, ends by ``deadline``: a connection's own timer
        # bounds each request on it (no timeout context per call), asyncio's bounds connecting.
        while True:
            if connection is None or sent is None:
                loop = asyncio.get_running_loop()
                async with asyncio.timeout_at(deadline):
                    _, connection = await loop.create_connection(
                        _Connection, self.host, self.port, ssl=self._ssl
                    )
                sent = connection.send(data, deadline, head_only)
            try:
                reply = await sent
                break
            except BaseException as exc:
                connection.close()  # failed, timed out or cancelled mid-answer: unusable
                failed = isinstance(exc, (OSError, ProtocolError)) and not isinstance(exc, TimeoutError)
                if not (failed and connection.reused and not connection.received):
                    raise
                connection = None  # a stale keep-alive connection: once more on a new one
        if connection.closed or len(self._idle) >= MAX_IDLE:
            connection.close()
        else:
            self._idle.append(connection)
        return reply
