"""Where and how quietly a benchmark ran: the machine, the code version, other work on the CPUs.

These machines are shared, so every run records the share of the CPUs that work other than the
benchmark took while it ran (``/proc/stat`` busy time minus this process's and its reaped
children's CPU time), and a harness can wait for a quiet machine before a run.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from typing import Any

import collage_inference
from collage_inference.bench.loadgen import environment
from collage_inference.config import REPO_ROOT

BUSY_SHARE = 0.25  # more of the CPUs than this busy without us: the machine is called busy


def code_version() -> str:
    """The package version and the git commit (with ``-dirty`` when the tree has changes)."""
    version = f"collage-inference {collage_inference.__version__}"
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}, git {head}{'-dirty' if dirty else ''}" if head else version


def machine() -> dict[str, Any]:
    """environment() plus the CPU model."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {**environment(), "cpu_model": cpu or "unknown"}


def cpu_busy(seconds: float = 1.0) -> float | None:
    """The share of all CPUs busy over ``seconds`` (from /proc/stat), measured while this process
    idles: unlike the load average it does not remember our own previous runs."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return round(1.0 - (idle1 - idle0) / max(total1 - total0, 1), 3)


def cpu_account() -> tuple[float, float, float] | None:
    """(CPU-seconds busy on the whole machine, CPU-seconds elapsed, CPU-seconds of this process and
    its reaped children) now; None where /proc/stat is missing."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:9]]  # guest time is already in user
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    t = os.times()
    idle = values[3] + values[4]  # idle + iowait
    own = t.user + t.system + t.children_user + t.children_system
    return (sum(values) - idle) / hz, sum(values) / hz, own


def others_share(
    before: tuple[float, float, float] | None, after: tuple[float, float, float] | None
) -> float | None:
    """The share of all CPUs that work other than this benchmark (and the cluster it started and
    stopped) used between two :func:`cpu_account` readings."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    busy, total, own = (a - b for a, b in zip(after, before, strict=True))
    return round(min(max((busy - own) / total, 0.0), 1.0), 3)


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []
