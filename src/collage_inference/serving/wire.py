"""A lean HTTP/1.1 client for the front end's hot path: one write per request, one parse.

Every request the front end admits costs at least one worker call, so the cost of that call is
most of the front end's CPU per request, and on a small machine CPU per request is latency.
aiohttp's client is general (cookies, redirects, streaming bodies, tracing) and writes the
headers and the body of a request as separate system calls. The worker call needs far less: a
body already in memory, POSTed over a keep-alive connection, and an answer with a
``Content-Length`` (or chunked) body. :class:`HttpClient` does exactly that, over asyncio
protocols, with a pool of idle connections per origin.

A request that fails on a reused connection before any byte of the answer arrived is sent once
more on a new connection: the server may have closed the idle connection just as we wrote to
it (a keep-alive race every HTTP client has to handle). Inference calls are pure functions of
their input, so sending one twice is harmless.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import cast
from urllib.parse import urlsplit

from collage_inference.errors import ConfigError, ProtocolError
from collage_inference.serving.kept import Kept

MAX_HEAD_BYTES = 64 * 2**10
MAX_IDLE = 256  # idle connections kept per origin
MAX_KEPT_HEADS = 256  # parsed answer heads kept per origin


@dataclass(frozen=True, eq=False)
class HttpReply:
    status: int
    headers: Mapping[str, str]  # names in lower case
    body: bytes


@dataclass(frozen=True, eq=False)
class _Head:
    """A parsed answer head: what the body's framing and the connection's reuse depend on."""

    status: int
    headers: Mapping[str, str]
    chunked: bool
    length: int  # of the body, when not chunked
    close: bool

    @classmethod
    def parse(cls, raw: bytes) -> _Head:
        status, headers = _parse_head(raw)
        chunked = headers.get("transfer-encoding", "").lower() == "chunked"
        length = headers.get("content-length", "0")
        if not chunked and not (length.isascii() and length.isdigit()):  # int() takes "-1", "1_0"
            raise ProtocolError(f"bad Content-Length {length!r}")
        close = headers.get("connection", "").lower() == "close"
        return cls(status, MappingProxyType(headers), chunked, 0 if chunked else int(length), close)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self, heads: Kept[bytes, _Head]) -> None:
        # Kept: on Python 3.11 every get_running_loop() is a getpid() system call.
        self.loop = asyncio.get_running_loop()
        self.heads = heads  # shared by the origin's connections
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False  # taken from the idle pool: a failure may be a stale keep-alive
        self._buffer = bytearray()
        self._waiter: asyncio.Future[HttpReply] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._head: _Head | None = None

    # -- asyncio callbacks --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio subclasses

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            self.close()  # bytes nobody asked for: the connection cannot be trusted any more
            return
        self._buffer += data
        try:
            reply = self._parse()
        except ProtocolError as exc:
            self._finish(exc)
            self.close()
            return
        if reply is not None:
            self._finish(reply)

    def eof_received(self) -> bool:
        self._fail(ConnectionResetError("the server closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionResetError("the connection was lost"))

    # -- requests ------------------------------------------------------------------------------

    def send(self, data: bytes, deadline: float) -> asyncio.Future[HttpReply]:
        """Write the request now; the future resolves with its answer, or fails with
        TimeoutError at ``deadline`` (loop time)."""
        assert self.transport is not None
        self._buffer.clear()
        self._head = None
        self._waiter = self.loop.create_future()
        self._timer = self.loop.call_at(deadline, self._time_out)
        self.transport.write(data)
        return self._waiter

    @property
    def answered_nothing(self) -> bool:
        """No byte of an answer arrived for the request in progress."""
        return self._head is None and not self._buffer

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

    def _fail(self, exc: BaseException) -> None:
        self.closed = True
        self._finish(exc)

    def _parse(self) -> HttpReply | None:
        buffer = self._buffer
        head = self._head
        if head is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD_BYTES:
                    raise ProtocolError("the answer's headers exceed 64 KiB")
                return None
            # A server answers calls of one kind with the same head but for a few lengths, so a
            # parsed head is kept, keyed by its bytes, and a repeated one is not parsed again.
            raw = bytes(buffer[:end])
            self._head = head = self.heads.get(raw) or self.heads.keep(raw, _Head.parse(raw))
            del buffer[: end + 4]
        if head.chunked:
            body = _dechunk(buffer)
            if body is None:
                return None
        else:
            if len(buffer) < head.length:
                return None
            body = bytes(buffer[: head.length])
        if head.close:
            self.closed = True
        return HttpReply(head.status, head.headers, body)


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise ProtocolError(f"malformed header line {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


def _dechunk(buffer: bytearray) -> bytes | None:
    """The body of a complete chunked encoding in ``buffer``; None while incomplete."""
    out, pos = bytearray(), 0
    while True:
        end = buffer.find(b"\r\n", pos)
        if end < 0:
            return None
        try:
            size = int(bytes(buffer[pos:end]).split(b";")[0], 16)
        except ValueError:
            raise ProtocolError("malformed chunk size") from None
        start = end + 2
        if size == 0:  # the last chunk; then optional trailers and an empty line
            return bytes(out) if buffer.find(b"\r\n\r\n", end) >= 0 else None
        if len(buffer) < start + size + 2:
            return None
        out += buffer[start : start + size]
        pos = start + size + 2


class HttpClient:
    """Keep-alive HTTP/1.1 to one origin (``http://host:port`` or ``https://...``)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{url!r} is not an http:// or https:// URL")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._host_header = parts.netloc
        self._idle: list[_Connection] = []
        self._heads: Kept[bytes, _Head] = Kept(MAX_KEPT_HEADS)

    def post(
        self, path: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> Awaitable[HttpReply]:
        """POST ``body`` to ``path``; the awaitable raises OSError, TimeoutError or ProtocolError
        on failure.

        On an idle keep-alive connection the request is written before this returns, so the
        server is at work while the caller's task gets scheduled; otherwise it is written once
        a new connection is up.
        """
        return self.send(self.post_head(path, headers, len(body)) + body, timeout)

    def post_head(self, path: str, headers: Mapping[str, str], length: int) -> bytes:
        """The head of a POST of ``length`` body bytes. A caller that sends many requests of one
        shape renders it once and passes it, with each body, to :meth:`send`."""
        head = [f"POST {path} HTTP/1.1", f"Host: {self._host_header}", f"Content-Length: {length}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")

    def send(self, data: bytes, timeout: float) -> Awaitable[HttpReply]:
        """Send a whole request (head and body, as :meth:`post` builds it); as :meth:`post`."""
        connection = self._take()
        deadline = (connection.loop if connection else asyncio.get_running_loop()).time() + timeout
        return self._exchange(data, connection, connection and connection.send(data, deadline), deadline)

    async def _exchange(
        self,
        data: bytes,
        connection: _Connection | None,
        sent: asyncio.Future[HttpReply] | None,
        deadline: float,
    ) -> HttpReply:
        # The whole exchange, retry included, ends by ``deadline``: a connection's own timer
        # bounds each request on it (no timeout context per call), asyncio's bounds connecting.
        while True:
            if connection is None or sent is None:
                async with asyncio.timeout_at(deadline):
                    connection = await self._connect()
                sent = connection.send(data, deadline)
            try:
                reply = await sent
            except TimeoutError:
                connection.close()
                raise
            except (OSError, ProtocolError):
                connection.close()
                if connection.reused and connection.answered_nothing:
                    connection = None  # a stale keep-alive connection: once more on a new one
                    continue
                raise
            except BaseException:  # cancellation mid-answer: unusable
                connection.close()
                raise
            break
        if connection.closed or len(self._idle) >= MAX_IDLE:
            connection.close()
        else:
            self._idle.append(connection)
        return reply

    def close(self) -> None:
        """Close the idle connections (requests in flight finish on theirs)."""
        for connection in self._idle:
            connection.close()
        self._idle.clear()

    def _take(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                connection.reused = True
                return connection
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(
            lambda: _Connection(self._heads), self.host, self.port, ssl=self._ssl
        )
        return connection
