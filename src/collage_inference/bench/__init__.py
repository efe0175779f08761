"""Benchmarking: an open-loop load generator and latency statistics.

:mod:`.stats` holds the histogram and summary (pure, no I/O); :mod:`.loadgen` drives a server
over HTTP on a fixed, seeded arrival schedule and measures latency from that schedule.
"""

from collage_inference.bench.loadgen import (
    LoadConfig,
    LoadResult,
    RequestRecord,
    arrival_offsets,
    run_load,
    run_load_sync,
)
from collage_inference.bench.stats import Histogram, LatencySummary

__all__ = [
    "Histogram",
    "LatencySummary",
    "LoadConfig",
    "LoadResult",
    "RequestRecord",
    "arrival_offsets",
    "run_load",
    "run_load_sync",
]
