"""Where every request of a fault run went: answered (by source), refused with a clear status,
or lost; per phase of the run and overall, with the front end's own counters to catch a
duplicate. Shared by the fault suite and the soak."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from collage_inference.bench.loadgen import RequestRecord
from collage_inference.config import ServeConfig
from collage_inference.serving.metrics import metric_total, parse_metrics

CLEAR_STATUSES = ("429", "502", "503", "504")
SOURCES = ("primary", "collage", "replica")


@dataclass(frozen=True)
class Phase:
    """A slice of the load's span (as fractions) and the fault injected during it."""

    name: str
    start: float
    end: float
    what: str


@dataclass
class Accounting:
    """Where every request of one phase (or of the whole run) went."""

    phase: str
    sent: int = 0
    answered: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES, 0))
    refused: dict[str, int] = field(default_factory=dict)  # clear HTTP statuses
    lost: dict[str, int] = field(default_factory=dict)  # no HTTP answer, by client-side cause
    correct: int = 0

    def add(self, record: RequestRecord) -> None:
        if record.sent_s is None:
            return  # never sent (client overflow or past the run): not the server's to answer
        self.sent += 1
        if record.status == "ok":
            key = record.source or "unreported"
            self.answered[key] = self.answered.get(key, 0) + 1
            self.correct += bool(record.correct)
        elif record.status in CLEAR_STATUSES:
            self.refused[record.status] = self.refused.get(record.status, 0) + 1
        else:
            self.lost[record.status] = self.lost.get(record.status, 0) + 1

    @property
    def n_answered(self) -> int:
        return sum(self.answered.values())

    @property
    def n_refused(self) -> int:
        return sum(self.refused.values())

    @property
    def n_lost(self) -> int:
        return sum(self.lost.values())


def account(records: tuple[RequestRecord, ...], span: float, phases: tuple[Phase, ...]) -> list[Accounting]:
    """Per-phase accounting (by scheduled time) and a final ``all`` row."""
    rows = [Accounting(p.name) for p in phases]
    overall = Accounting("all")
    for record in records:
        overall.add(record)
        if record.warmup:
            continue
        index = phase_index(record.scheduled_s / span if span > 0 else 0.0, phases)
        if index is not None:
            rows[index].add(record)
    return [*rows, overall]


def phase_index(fraction: float, phases: tuple[Phase, ...]) -> int | None:
    """The phase a point of the load's span (as a fraction) falls in; past the end, the last."""
    for i, phase in enumerate(phases):
        if phase.start <= fraction < phase.end:
            return i
    return len(phases) - 1 if phases and fraction >= phases[-1].end else None


def format_accounting(rows: list[Accounting], duplicated: int) -> str:
    """The accounting as a markdown table."""
    lines = [
        "| phase | sent | primary | collage | replica | refused (status) | lost | accuracy |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in rows:
        refused = ", ".join(f"{n}x{s}" for s, n in sorted(r.refused.items())) or "0"
        lost = str(r.n_lost) + (f" ({', '.join(f'{n} {k}' for k, n in r.lost.items())})" if r.lost else "")
        accuracy = f"{r.correct / r.n_answered:.1%}" if r.n_answered else "n/a"
        a = r.answered
        lines.append(
            f"| {r.phase} | {r.sent} | {a['primary']} | {a['collage']} | {a['replica']} | {refused} | "
            f"{lost} | {accuracy} |"
        )
    lines.append(f"\nduplicated answers: {duplicated}")
    return "\n".join(lines)


async def fetch_metrics(session: aiohttp.ClientSession, url: str) -> dict[tuple[str, str], float]:
    """The front end's /metrics as {(name, labels): value}."""
    async with session.get(f"{url}/metrics") as response:
        return parse_metrics(await response.text())


def resolved_by_frontend(before: dict, after: dict) -> int:
    """Requests the front end settled (answered, failed, or shed) between two scrapes."""
    names = ("nv_inference_request_success_total", "nv_inference_request_failure_total", "collage_shed_total")
    return int(sum(metric_total(after, n) - metric_total(before, n) for n in names))


def rss_mb(pid: int) -> float:
    """Resident memory of a process, MiB (from /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return math.nan


def cluster_config(models_dir: Path, **overrides: Any) -> ServeConfig:
    """The cluster every fault run uses: collage mode, S = 2 (four s-CNN workers, one collage
    worker), the front end on a free port."""
    return ServeConfig(
        mode="collage", grid=2, models_dir=models_dir, port=0, request_timeout=5.0, **overrides
    )
