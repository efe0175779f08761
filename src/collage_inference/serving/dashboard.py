"""``GET /dashboard``: one self-contained page that shows the front end at work, updated every
second from two small JSON endpoints over the front end's own counters (no Prometheus, nothing
fetched from elsewhere, so it works on a machine without internet):

* ``/dashboard/state``: p50/p99 latency per second over the last minutes, answers by source,
  re-issues, group fill, the current S and group deadline, each worker's state, outstanding
  calls and recent latency;
* ``/dashboard/queries``: the latest backup queries (collages, or ParM's parity queries) as the
  backup worker saw them, each cell labelled with what it answered, the cells that answered a
  request outlined. Asking for either keeps the front end collecting them for a few seconds
  (:class:`~collage_inference.serving.live.LiveView`); no one asking, it collects nothing.

The routes follow the token rules of every non-health endpoint. A browser cannot send a bearer
header on navigation, so the token is also accepted as the password of HTTP Basic
authentication (any user name), which a browser asks for after the 401.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Any

from collage_inference.serving.types import Source
from collage_inference.serving.web.routes import Request, Response, Route

if TYPE_CHECKING:
    from collage_inference.serving.frontend import FrontEnd

PAGE = resources.files("collage_inference.serving").joinpath("dashboard.html").read_bytes()


class Dashboard:
    """The page and its two JSON endpoints over one front end."""

    def __init__(self, frontend: FrontEnd) -> None:
        self.frontend = frontend

    def routes(self) -> list[Route]:
        return [
            Route("GET", "/dashboard", self.page),
            Route("GET", "/dashboard/state", self.state),
            Route("GET", "/dashboard/queries", self.queries),
        ]

    def page(self, request: Request) -> Response:
        return Response(PAGE, 200, {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store"})

    def state(self, request: Request) -> Response:
        now = self.frontend.clock.now()
        self.frontend.live.watch(now)
        return Response.json(dashboard_state(self.frontend, now))

    def queries(self, request: Request) -> Response:
        now = self.frontend.clock.now()
        self.frontend.live.watch(now)
        return Response.json({"queries": self.frontend.live.queries(now)})


def dashboard_state(frontend: FrontEnd, now: float) -> dict[str, Any]:
    """Everything ``/dashboard/state`` answers (see the module docstring)."""
    metrics, plan = frontend.metrics, frontend.grouper.last_plan
    sizes = metrics.group_sizes
    groups = sum(sizes.values())
    sources = [Source.PRIMARY, Source.PARITY if frontend.parity else Source.COLLAGE, Source.REPLICA]
    workers = [
        {
            "id": w.id,
            "model": w.info.model if w.info else "",
            "url": w.transport.name,
            "up": w.up,
            "outstanding": w.outstanding,
            "calls": w.calls,
            "latency_ms": round(w.latency * 1e3, 2),
        }
        for pool in frontend.pools
        for w in pool.workers
    ]
    return {
        "time": round(now, 3),
        "model": frontend.settings.model_name,
        "mode": frontend.mode.name,
        "k": frontend.grouper.group_size(plan.grid) if plan else None,
        "grid": plan.grid if plan and not frontend.parity else None,
        "group_deadline_ms": round(metrics.group_deadline * 1e3, 2) if groups else None,
        "straggler_window_ms": round(metrics.straggler_window * 1e3, 1) if metrics.straggler_window else None,
        "group_fill": {
            "mean": round(sum(n * c for n, c in sizes.items()) / groups, 3) if groups else None,
            "sizes": {str(n): c for n, c in sorted(sizes.items())},
        },
        "answered": metrics.success,
        "answers": {str(s): metrics.answers[s] for s in sources},
        "reissues": metrics.reissues,
        "failed": sum(metrics.failures.values()),
        "shed": metrics.shed,
        "in_flight": frontend.in_flight,
        "series": frontend.live.series(now),
        "workers": workers,
    }
