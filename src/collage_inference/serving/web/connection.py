"""One client connection of the server: llhttp frames its requests, this answers them in order.

llhttp (Node's parser, in C) refuses what is malformed or ambiguous (two Content-Lengths, a
Content-Length beside chunked) before a handler sees it; the limits are applied here: a head
over 64 KiB gets 431, a body over ``max_body_bytes`` 413 as soon as its declared length is known
(or a chunked one grows past it), a request incomplete ``body_timeout`` seconds after it began
408. Requests are answered in order, one at a time; those a client pipelines meanwhile wait,
and reading pauses if they pile up. Refusals close the connection the way nginx does (a
lingering close): the answer is written and the write side shut, then what the client still
sends is read and dropped for a while, so a client that sends its whole body before reading
(urllib, requests) reads the 413 instead of the reset that closing a socket with unread input
would send it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, cast

from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade, HttpRequestParser

from collage_inference.errors import (
    HeadersTooLargeError,
    MethodNotAllowedError,
    ProtocolError,
    RequestTimeoutError,
    ServingError,
)
from collage_inference.serving.web.routes import BodyBuffer, Request, Response, add_header, log

if TYPE_CHECKING:
    from collage_inference.serving.web.server import HttpServer

MAX_HEAD_BYTES = 64 * 2**10
KEEPALIVE_S = 30.0  # idle keep-alive connections do not hold sockets for ever
LINGER_S = 5.0  # how long a refused client may go on sending before its socket closes
LINGER_MIN_BYTES = 64 * 2**20  # ... and how much of it is read, at least (else 2 x the body limit)
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_HEAD_TOO_LARGE = "the request line and headers exceed 64 KiB"
_NO_UPGRADES = "upgrades are not supported; send plain HTTP/1.1 requests"


class Connection(asyncio.Protocol):
    """One client connection. The parser calls the ``on_*`` methods as it frames requests;
    what they raise stops it, and :meth:`_refuse` answers that."""

    def __init__(self, server: HttpServer) -> None:
        self.loop = asyncio.get_running_loop()  # kept: on Python 3.11 each call is a getpid()
        self.server = server
        self.max_body = server.limits.max_body_bytes
        self.parser = HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.in_message = False  # the request being read ...
        self.in_head = True  # ... is in its head (or none began): its bytes are counted
        self.head_bytes = 0
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body = BodyBuffer(self.max_body)
        # Requests read, waiting for the answer in progress: (request or refusal, keep-alive).
        self.pending: deque[tuple[Request | ServingError, bool]] = deque()
        self.pending_bytes = 0
        self.answering: asyncio.Task[None] | None = None
        self.closing = False  # no request is taken after the last one read
        self.write_paused = self.read_paused = self.lingering = False
        self.linger_left = 0
        # A timer costs about 2 µs (uvloop call_later + cancel): a request read in one piece gets
        # no deadline, and the idle check is not re-armed per answer but looks every KEEPALIVE_S.
        self._deadline: asyncio.TimerHandle | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio subclasses
        self.server.connections.add(self)
        self.idle_since = self.loop.time()
        self._keepalive = self.loop.call_later(KEEPALIVE_S, self._check_idle)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            self.linger_left -= len(data)
            if self.linger_left <= 0:
                self.close()
            return
        if self.in_head:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except HttpParserCallbackError as exc:  # a callback refused the request (or failed): why
            self._refuse(exc.__context__ or exc)
        except HttpParserUpgrade:  # CONNECT and upgrades are refused in on_headers_complete
            self._refuse(ProtocolError(_NO_UPGRADES))
        except HttpParserError as exc:
            self._refuse(ProtocolError(f"malformed request: {exc}; send HTTP/1.1"))
        else:
            if self.in_message and self.in_head and self.head_bytes > MAX_HEAD_BYTES:
                self._refuse(HeadersTooLargeError(_HEAD_TOO_LARGE))
            elif self.in_message and self._deadline is None and not self.read_paused:
                self._deadline = self.loop.call_later(self.server.limits.body_timeout, self._too_slow)

    def eof_received(self) -> bool:
        if self.answering or self.pending:
            self.closing = True  # answer what was read, then close
            return True
        self.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self._cancel_timers()
        self.transport = None
        self.pending.clear()

    def pause_writing(self) -> None:
        self.write_paused = True  # a client that does not read: stop answering its requests

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.answering is None:
            self._answer_pending()

    def close(self) -> None:
        self._cancel_timers()
        transport, self.transport = self.transport, None
        if transport is not None:
            transport.close()

    def on_message_begin(self) -> None:
        self.in_message = True
        self.url = b""
        self.headers = {}

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        add_header(self.headers, name, value)

    def on_headers_complete(self) -> None:
        self.in_head = False
        # The bytes read while in the head (body bytes of the same reads too) bound its size
        # from above; only past the limit is the head itself measured.
        if self.head_bytes > MAX_HEAD_BYTES:
            size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers.items())
            if size > MAX_HEAD_BYTES:
                raise HeadersTooLargeError(_HEAD_TOO_LARGE)
        self.head_bytes = 0
        if self.parser.should_upgrade():
            if self.parser.get_method() == b"CONNECT":
                raise MethodNotAllowedError("CONNECT is not supported; this is not a proxy")
            raise ProtocolError(_NO_UPGRADES)
        length = self.headers.get("content-length")  # llhttp checked that it is digits
        self.body = BodyBuffer(self.max_body, None if length is None else int(length))
        # 100 Continue only while nothing is ahead of this request (an interim answer must not
        # overtake a final one) and the request is to be answered at all.
        expect = self.headers.get("expect")
        ahead = self.answering or self.pending or self.closing
        if expect is not None and not ahead and expect.lower() == "100-continue":
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self.body.add(body)

    def on_message_complete(self) -> None:
        self.in_message = False
        self.in_head = True
        self._cancel_deadline()
        if self.closing:
            return  # pipelined after the last request this connection takes
        path, _, query = self.url.decode("latin-1").partition("?")
        body = self.body.bytes()
        request = Request(self.parser.get_method().decode(), path, query, self.headers, body)
        keep_alive = self.parser.should_keep_alive()
        self.closing = not keep_alive
        if self.answering is None and not self.pending and not self.write_paused:
            self._answer(request, keep_alive)
            return
        self.pending.append((request, keep_alive))
        self.pending_bytes += len(body)
        if self.pending_bytes > self.max_body + MAX_HEAD_BYTES and not self.read_paused:
            self.read_paused = True  # a client pipelining faster than it is answered
            self.transport.pause_reading()
            self._cancel_deadline()  # its next request cannot arrive meanwhile

    def _answer(self, request: Request, keep_alive: bool) -> None:
        response = self.server.router.handle(request)
        if isinstance(response, Response):
            self._write(request, response, keep_alive)
        else:
            self.answering = self.loop.create_task(self._answer_later(request, response, keep_alive))

    async def _answer_later(self, request: Request, pending: Awaitable[Response], keep_alive: bool) -> None:
        response = await pending  # the router's awaitables answer failures, they do not raise
        self.answering = None
        self._write(request, response, keep_alive)
        self._answer_pending()

    def _answer_pending(self) -> None:
        """Answer the requests read meanwhile, in order, until one has to wait (in a loop, not
        one nested call per request: a long pipeline must not grow the stack)."""
        pending = self.pending
        while pending and self.answering is None and not self.write_paused and self.transport is not None:
            item, keep_alive = pending.popleft()
            if isinstance(item, ServingError):
                self._write_refusal(item)
                continue
            self.pending_bytes -= len(item.body)
            if self.read_paused and self.pending_bytes <= self.max_body:
                self.read_paused = False
                self.transport.resume_reading()
                if self.in_message:
                    self._deadline = self.loop.call_later(self.server.limits.body_timeout, self._too_slow)
            self._answer(item, keep_alive)

    def _write(self, request: Request, response: Response, keep_alive: bool) -> None:
        if self.transport is None:
            return  # the client went away; the request was still carried out
        close = not keep_alive or (self.closing and not self.pending) or self.server.closing
        if close:
            connection = "close"
        else:  # an HTTP/1.0 client keeps the connection only if told it is kept
            connection = "keep-alive" if request.headers.get("connection") == "keep-alive" else ""
        body = response.body
        head = render_head(response.status, response.headers, len(body), connection, self.server.date)
        self.transport.write(head if request.method == "HEAD" else head + body)
        if close:
            self.close()
        else:
            self.idle_since = self.loop.time()

    def _refuse(self, error: BaseException) -> None:
        """Answer ``error`` after what is ahead of it and close; read no request after it."""
        self.closing = True
        self.lingering = True  # what the client still sends is read and dropped
        self.linger_left = max(2 * self.max_body, LINGER_MIN_BYTES)
        self._cancel_deadline()
        if self.read_paused and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()
        if not isinstance(error, ServingError):  # a failure of this module's own code
            log.error("unexpected error reading a request", exc_info=error)
            error = ServingError("internal error; see the server log")
        if self.answering is None and not self.pending:
            self._write_refusal(error)
        else:
            self.pending.append((error, False))

    def _write_refusal(self, error: ServingError) -> None:
        transport = self.transport
        if transport is None:
            return
        answer = self.server.router.error(error, "a request")
        head = render_head(answer.status, answer.headers, len(answer.body), "close", self.server.date)
        transport.write(head + answer.body)
        if transport.can_write_eof():
            transport.write_eof()  # the client reads the answer and an end; we go on reading
        self._deadline = self.loop.call_later(LINGER_S, self.close)

    def _too_slow(self) -> None:
        self._deadline = None
        what = "the request head" if self.in_head else "the body"
        seconds = self.server.limits.body_timeout
        self._refuse(RequestTimeoutError(f"{what} took longer than {seconds:g}s to arrive; send it at once"))

    def _check_idle(self) -> None:
        """Close the connection if it has been idle for KEEPALIVE_S; else look again when it
        could have been."""
        busy = self.answering or self.pending or self.in_message or self.lingering
        idle = 0.0 if busy else self.loop.time() - self.idle_since
        if idle >= KEEPALIVE_S:
            self._keepalive = None
            self.close()
        else:
            self._keepalive = self.loop.call_later(KEEPALIVE_S - idle, self._check_idle)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _cancel_timers(self) -> None:
        self._cancel_deadline()
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None


_STATUS_LINES = {status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n" for status in HTTPStatus}


def render_head(status: int, headers: Mapping[str, str], length: int, connection: str, date: str) -> bytes:
    """The head of an answer with a body of ``length`` bytes; ``connection``: the value of a
    Connection header ("close", "keep-alive"), or "" for none; ``date``: the Date and Server
    lines, which the server formats once a second."""
    status_line = _STATUS_LINES.get(status) or f"HTTP/1.1 {status} \r\n"
    head = f"{status_line}Content-Length: {length}\r\n{date}"
    for name, value in headers.items():
        head += f"{name}: {value}\r\n"
    if connection:
        head += f"Connection: {connection}\r\n"
    return (head + "\r\n").encode("latin-1")
