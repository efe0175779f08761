"""The one HTTP/1.1 server of the project: asyncio protocols over llhttp (``httptools``), one
:class:`~.connection.Connection` per client.

:func:`serve` runs a :class:`~.routes.Router` until SIGTERM or SIGINT and prints
``ready on http://HOST:PORT`` once listening, the line launchers wait for; :func:`start_server`
runs one in the background (tests, embedding).
"""

from __future__ import annotations

import asyncio
import gc
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate

from collage_inference.config import Limits
from collage_inference.errors import ListenError
from collage_inference.serving.web.connection import Connection
from collage_inference.serving.web.routes import Router

READY_PREFIX = "ready on "
DEFAULT_LIMITS = Limits()


class HttpServer:
    """The listening protocol factory: serves ``router`` and tracks connections for a
    graceful close."""

    def __init__(self, router: Router, limits: Limits = DEFAULT_LIMITS) -> None:
        self.router = router
        self.limits = limits
        self.connections: set[Connection] = set()
        self.date = ""  # the Date and Server lines of every answer, from the first connection on
        self.closing = False
        self._ticker: asyncio.TimerHandle | None = None

    def __call__(self) -> asyncio.Protocol:
        if self._ticker is None:
            self._tick()
        return Connection(self)

    def _tick(self) -> None:
        """Format the Date header once a second: formatdate takes about 2 µs, too much per answer."""
        now = time.time()
        self.date = f"Date: {formatdate(now, usegmt=True)}\r\nServer: collage-inference\r\n"
        self._ticker = asyncio.get_running_loop().call_later(1.0 - now % 1.0, self._tick)

    async def shutdown(self, timeout: float) -> None:
        """Take no more requests, close idle connections now, give answers in progress up to
        ``timeout`` seconds, then close every connection."""
        self.closing = True
        if self._ticker is not None:
            self._ticker.cancel()
        answering = []
        for connection in list(self.connections):
            connection.closing = True
            if connection.answering is None:
                connection.close()
            else:
                answering.append(connection.answering)
        if answering:
            await asyncio.wait(answering, timeout=timeout)
        for connection in list(self.connections):
            connection.close()


@dataclass(frozen=True)
class Listening:
    """A server listening on ``port``: :meth:`close` stops it gracefully."""

    port: int
    url: str
    _listener: asyncio.AbstractServer
    _server: HttpServer

    async def close(self, timeout: float = 5.0) -> None:
        """Stop listening, close idle connections, give answers in progress ``timeout`` s."""
        self._listener.close()
        await self._server.shutdown(timeout)


async def start_server(router: Router, host: str, port: int, limits: Limits = DEFAULT_LIMITS) -> Listening:
    """Listen on ``host:port`` (0 picks a free port) and serve ``router`` in the background."""
    server = HttpServer(router, limits)
    loop = asyncio.get_running_loop()
    try:
        listener = await loop.create_server(server, host, port, reuse_address=True)
    except OSError as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror}; pick another --port") from exc
    bound = listener.sockets[0].getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return Listening(bound, f"http://{shown}:{bound}", listener, server)


async def serve(
    router: Router,
    host: str,
    port: int,
    *,
    limits: Limits = DEFAULT_LIMITS,
    shutdown_timeout: float = 5.0,
    draining: Callable[[], object] | None = None,
) -> None:
    """Serve ``router`` until SIGTERM/SIGINT; port 0 picks a free port, shown in the ready line.

    On the signal ``draining()`` is called first (the caller stops saying it is ready), then the
    server closes as :meth:`Listening.close` does; then this returns and the caller cleans up.
    """
    # Everything built so far (modules, models, metadata) lives as long as the server: freeze it
    # out of the collector's view, and collect the young generation less often, so that the
    # per-request garbage collections stay short and rare (they show in the tail).
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 100)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        listening = await start_server(router, host, port, limits)
        print(f"{READY_PREFIX}{listening.url}", flush=True)
        await stop.wait()
        if draining is not None:
            draining()
        await listening.close(shutdown_timeout)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
