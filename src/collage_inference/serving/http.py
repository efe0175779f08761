"""What every HTTP server of the project shares: the one error conversion and the run loop.

:func:`error_middleware` is the single place where exceptions become HTTP answers
(``{"error": message}`` with the status the :class:`ServingError` subclass names), so a bad
request never takes a server down. :func:`serve_app` runs an app until SIGTERM or SIGINT and
prints ``ready on http://HOST:PORT`` once listening, the line launchers wait for.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

from aiohttp import web

from collage_inference.errors import CollageError, ConfigError, ServingError

log = logging.getLogger("collage_inference.serving")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
READY_PREFIX = "ready on "


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Convert every failure into a JSON error answer with the right status."""
    try:
        return await handler(request)
    except ServingError as exc:
        return web.json_response({"error": str(exc)}, status=exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return web.json_response({"error": exc.reason}, status=exc.status)
    except CollageError as exc:
        log.error("request failed: %s", exc)
        return web.json_response({"error": str(exc)}, status=500)
    except Exception:
        log.exception("unexpected error serving %s %s", request.method, request.path)
        return web.json_response({"error": "internal error; see the server log"}, status=500)


async def serve_app(app: web.Application, host: str, port: int, shutdown_timeout: float = 5.0) -> None:
    """Serve ``app`` until SIGTERM/SIGINT; port 0 picks a free port, printed in the ready line."""
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        try:
            await web.TCPSite(runner, host, port, reuse_address=True).start()
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}; pick another --port") from exc
        bound_port = runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        print(f"{READY_PREFIX}http://{shown}:{bound_port}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
