"""What the dashboard shows that the metrics do not: latency second by second, and the latest
backup queries as pictures.

The front end calls :meth:`LiveView.observe` for every answer: one list append into the
current second's bucket, so the page has minutes of history the moment it opens. The pictures
cost nothing while no one watches: the front end keeps a backup query (a reference to the
pixels it already encoded, and its reply's labels) only while :meth:`LiveView.watching` is
true, which a dashboard request makes true for ``watch_s`` seconds. PNGs are drawn when the
page asks for them, never on the request path.
"""

from __future__ import annotations

import base64
import io
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from collage_inference.serving.types import Answer, Group, Reply, Source

_BACKUP_SOURCES = (Source.COLLAGE, Source.PARITY)


@dataclass(eq=False)
class ShownQuery:
    """One backup query as sent: its pixels, its requests by cell, what the backup answered for
    each cell (None until it answers) and the requests it answered for (their primary straggled)."""

    group_id: int
    kind: str  # "collage" or "parity"
    grid: int
    pixels: np.ndarray
    requests: tuple[str, ...]
    sent_at: float
    labels: list[str | None] = field(default_factory=list)
    rescued: dict[str, str] = field(default_factory=dict)  # request id -> the class it was answered

    def to_json(self, now: float) -> dict[str, Any]:
        buffer = io.BytesIO()
        pixels = self.pixels[:, :, 0] if self.pixels.shape[2] == 1 else self.pixels
        Image.fromarray(pixels).save(buffer, format="PNG")
        cells = [
            {
                "request": request,
                "label": self.labels[i] if i < len(self.labels) else self.rescued.get(request),
                "rescued": request in self.rescued,
            }
            for i, request in enumerate(self.requests)
        ]
        return {
            "group": self.group_id,
            "kind": self.kind,
            "grid": self.grid,
            "age_s": round(now - self.sent_at, 1),
            "png": base64.b64encode(buffer.getvalue()).decode(),
            "cells": cells,
        }


class LiveView:
    """Per-second latencies over the last ``window_s`` seconds and the last ``queries`` backup
    queries (kept while someone watches)."""

    def __init__(self, window_s: int = 300, queries: int = 6, watch_s: float = 10.0) -> None:
        self.window_s, self.watch_s = window_s, watch_s
        self._seconds: deque[tuple[int, list[float]]] = deque()
        self._queries: deque[ShownQuery] = deque(maxlen=queries)
        self._watched_until = float("-inf")

    def observe(self, answer: Answer, now: float) -> None:
        second = int(now)
        if not self._seconds or self._seconds[-1][0] != second:
            self._seconds.append((second, []))
            while self._seconds[0][0] <= second - self.window_s:
                self._seconds.popleft()
        self._seconds[-1][1].append(answer.latency)
        if answer.source in _BACKUP_SOURCES and self._queries:
            for query in self._queries:
                if answer.request_id in query.requests:
                    query.rescued[answer.request_id] = answer.class_name

    def watch(self, now: float) -> None:
        """A dashboard asked: keep backup queries for the next ``watch_s`` seconds."""
        self._watched_until = now + self.watch_s

    def watching(self, now: float) -> bool:
        return now < self._watched_until

    def keep_query(self, group: Group, kind: str, pixels: np.ndarray, now: float) -> None:
        self._queries.append(ShownQuery(group.id, kind, group.grid, pixels, group.request_ids, now))

    def query_answered(self, group: Group, reply: Reply, class_names: Sequence[str]) -> None:
        """The labels of a kept collage's cells (``empty`` past the classes)."""
        query = next((q for q in self._queries if q.group_id == group.id), None)
        if query is None or query.kind != "collage":
            return
        names = [*class_names, "empty"]
        query.labels = [names[p.label] if 0 <= p.label < len(names) else "?" for p in reply.predictions]

    def series(self, now: float) -> list[dict[str, Any]]:
        """Each second with answers in the window: seconds before ``now``, count, p50 and p99 (ms)."""
        out = []
        for second, latencies in self._seconds:
            if second <= now - self.window_s or not latencies:
                continue
            p50, p99 = np.percentile(latencies, [50, 99]) * 1e3
            out.append({"t": round(second - now, 1), "n": len(latencies), "p50": round(float(p50), 2),
                        "p99": round(float(p99), 2)})  # fmt: skip
        return out

    def queries(self, now: float) -> list[dict[str, Any]]:
        """The kept backup queries, newest first, with their pictures."""
        return [q.to_json(now) for q in reversed(self._queries)]
