"""A fault-injecting HTTP proxy: put it between the front end and a worker, then break it.

    python -m collage_inference.bench.faults.chaos --target http://127.0.0.1:8001 --port 0
    curl -X PUT localhost:PORT/_chaos -d '{"mode": "hang"}'

Modes, switched at run time with ``PUT /_chaos`` (``GET /_chaos`` tells the current one):

``pass``     forward every request to the target and its answer back (the default)
``hang``     read the request, then never answer: a process that accepts connections but is stuck
``garbage``  answer every request 200 with random bytes, as a corrupted or confused server would
``down``     close each connection without a word, as a crashed host behind a live port would

Switching back to ``pass`` ends every hung request (the connection is closed), so a test's
clients all get an outcome. The proxy is the fault-injection suite's instrument
(:mod:`collage_inference.bench.faults`), a real process on loopback like the workers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

import aiohttp
from aiohttp import web

from collage_inference.serving.web.routes import run
from collage_inference.serving.web.server import READY_PREFIX

MODES = ("pass", "hang", "garbage", "down")
CONTROL_PATH = "/_chaos"
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


class ChaosProxy:
    """The proxy's state: its target, its current mode, and the requests it holds hung."""

    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.mode = "pass"
        self.counts = dict.fromkeys(MODES, 0)
        self._released = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise web.HTTPBadRequest(reason=f"unknown mode {mode!r}; one of {', '.join(MODES)}")
        self.mode = mode
        if mode != "hang":  # wake every hung request; it then drops its connection
            self._released.set()
            self._released = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        mode = self.mode
        self.counts[mode] += 1
        body = await request.read()
        if mode == "hang":
            await self._released.wait()
            mode = "down"
        if mode == "down":
            if request.transport is not None:
                request.transport.close()
            raise ConnectionResetError("chaos proxy: down")
        if mode == "garbage":
            return web.Response(body=os.urandom(64), content_type="application/json")
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        try:
            async with self._session.request(
                request.method, self.target + request.path_qs, data=body, headers=headers
            ) as upstream:
                payload = await upstream.read()
                out = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS}
                return web.Response(status=upstream.status, body=payload, headers=out)
        except (aiohttp.ClientError, OSError) as exc:  # the target is gone: say so, as a gateway does
            return web.json_response({"error": f"chaos proxy: target unreachable: {exc!r}"}, status=502)

    async def start(self, app: web.Application):
        self._session = aiohttp.ClientSession()
        yield
        self._released.set()
        await self._session.close()


def build_app(target: str) -> web.Application:
    proxy = ChaosProxy(target)
    app = web.Application(client_max_size=256 * 2**20)

    async def control(request: web.Request) -> web.Response:
        if request.method == "PUT":
            proxy.set_mode(str((await request.json()).get("mode")))
        return web.json_response({"mode": proxy.mode, "counts": proxy.counts})

    app.router.add_route("*", CONTROL_PATH, control)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    app.cleanup_ctx.append(proxy.start)
    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="chaos-proxy", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="the server to proxy, http://HOST:PORT")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed when ready)")
    args = p.parse_args(argv)
    run(_serve(build_app(args.target), args.host, args.port))
    return 0


async def _serve(app: web.Application, host: str, port: int) -> None:
    """Serve until SIGTERM/SIGINT, printing the ready line launchers wait for. The proxy is an
    outside server standing in for a broken one, so it runs on aiohttp, not on our server."""
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"{READY_PREFIX}http://{host}:{bound}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    sys.exit(main())
