"""Redundancy modes and decoder policies: the vocabulary of strategies a deployment can run.

Every mode runs on the same workers and the same code path.

Each mode is a row of settings read by the front end; nothing else branches on the mode, so a
comparison between modes measures the strategy and not different code.

| mode | s-CNN workers | backup | extra cost vs ``none`` |
| --- | --- | --- | --- |
| none | k | nothing | 0 |
| equal | k + 1 | nothing, one more worker in the pool | 1/k |
| replicate | k + 1 | re-issue to another worker after a fixed timeout | 1/k |
| hedge | k + 1 | second copy once a request outlives the running p95 | 1/k |
| replicate-all | 2k | every request to two workers at once | 1 |
| collage | k | one collage worker per k requests | 1/k |
| collage-2 | k | two collage workers share the collages | 2/k |
| parm | k | one parity worker per k requests (ParM, :mod:`collage_inference.parm`) | 1/k |

Mode ``parm`` is the closest peer's strategy on the same stages: the grouper forms groups of the
parity model's k, the encoder builds one parity query per group, and the decoder recovers one
missing primary by subtraction. Its ``collage`` flag means "a backup worker answers per group".

Extra cost counts worker processes (the resource a cloud bill counts), with the collage
worker priced as one s-CNN worker although its model costs at most one s-CNN pass per collage.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from collage_inference.errors import ConfigError


@dataclass(frozen=True)
class Mode:
    """One redundancy strategy. ``reissue``: when a late request gets a second s-CNN call:
    never, after ``replicate_timeout`` seconds (fixed), or past the running p95 (adaptive)."""

    name: str
    extra_workers: int  # s-CNN workers beyond k (``k`` itself for replicate-all)
    collage: bool = False
    copies: int = 1  # s-CNN calls sent at admission
    reissue: str = "never"  # never | fixed | p95
    collage_workers: int = 1  # collage workers per grid served
    parity: bool = False  # the group's backup is a ParM parity query, not a collage

    def scnn_workers(self, k: int) -> int:
        return k + (k if self.name == "replicate-all" else self.extra_workers)

    def extra_cost(self, k: int, collage_workers: int | None = None) -> float:
        """Worker processes beyond the k of ``none``, as a share of k."""
        collage = self.collage_workers if collage_workers is None else collage_workers
        extra = self.scnn_workers(k) - k + (collage if self.collage else 0)
        return extra / k


class DecoderPolicy(StrEnum):
    """How the decoder chooses between a primary and a collage answer."""

    FIRST = "first"  # whichever usable answer arrives first wins: lowest latency
    PATIENT = "patient"  # a collage answer waits for the primary up to an adaptive deadline
    CONFIDENT = "confident"  # a confident collage cell answers at once, the others wait as in patient


# Where a re-issue for lateness goes: only an idle worker (else it is skipped: a busy worker
# would answer no sooner and queue the copy ahead of new work), or the least-loaded other one.
REISSUE_TARGETS = ("idle", "least-loaded")

MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("none", 0),
        Mode("equal", 1),
        Mode("replicate", 1, reissue="fixed"),
        Mode("hedge", 1, reissue="p95"),
        Mode("replicate-all", 0, copies=2),
        Mode("collage", 0, collage=True),
        Mode("collage-2", 0, collage=True, collage_workers=2),
        Mode("parm", 0, collage=True, parity=True),
    )
}


def get_mode(name: str) -> Mode:
    if name not in MODES:
        raise ConfigError(f"unknown mode {name!r}; choose one of {', '.join(MODES)}")
    return MODES[name]
