"""Straggler injection: explicit, seeded, reported, and off unless asked for.

A worker on an idle machine never straggles, so experiments inject slowness on purpose:

* a delay sampler draws latencies in seconds: ``trace:PATH[:SCALE]`` (a NumPy array of measured
  latencies, such as ``../shared/traces/cloud-latency-trace.npy``), ``bimodal[:SCALE]`` (a
  parametric model fitted to that trace, so nothing depends on the file), ``pareto:alpha=A,
  scale=XM[,cap=C]`` (a heavy tail) or ``none``;
* a kind says how the draws apply. ``per-request``: every request takes max(compute, draw),
  exactly as in the published collage-inference experiments. ``per-instance``: the worker
  enters slow periods (onsets are a Poisson process of ``onset_rate`` per second, lengths are
  exponential with mean ``period_s``); one delay is drawn per period and added to every request
  served in it, as a noisy neighbour would;
* :class:`CpuContention` burns real CPU in background processes for a duty-cycle fraction,
  so the slowness comes from the machine rather than from a sleep.

The worker sleeps the injected delay on its single compute thread, as the published code did,
so requests queued behind a straggler wait for it too.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from collage_inference.errors import ConfigError

KINDS = ("per-request", "per-instance")


class DelaySampler(Protocol):
    """Draws latencies in seconds."""

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray: ...

    def describe(self) -> str: ...


@dataclass(frozen=True, eq=False)
class TraceSampler:
    """Latencies drawn uniformly, with replacement, from a recorded trace, times ``scale``."""

    values: np.ndarray
    scale: float = 1.0
    source: str = ""

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return rng.choice(self.values, size) * self.scale

    def describe(self) -> str:
        return f"trace:{self.source}:{self.scale:g}"


@dataclass(frozen=True)
class BimodalSampler:
    """The cloud trace as two modes, fitted to ``cloud-latency-trace.npy``.

    Fast mode (98%): ``0.038 + lognormal(-2.309, 0.311)`` s: mean 0.142, overall median 0.138,
    p90 0.19, p95 0.215. Slow mode (2%): normal(0.704, 0.045) clipped to [0.5, 1.04]: the trace's
    slow samples sit in a narrow peak around 0.70 s, not uniformly across their range.
    """

    scale: float = 1.0
    slow_fraction: float = 0.0204
    fast_loc: float = 0.038
    fast_mu: float = -2.309
    fast_sigma: float = 0.311
    slow_mean: float = 0.704
    slow_std: float = 0.045
    slow_min: float = 0.5
    slow_max: float = 1.04

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        fast = self.fast_loc + np.exp(self.fast_mu + self.fast_sigma * rng.standard_normal(size))
        slow = np.clip(rng.normal(self.slow_mean, self.slow_std, size), self.slow_min, self.slow_max)
        return np.where(rng.random(size) < self.slow_fraction, slow, fast) * self.scale

    def describe(self) -> str:
        return f"bimodal:{self.scale:g}"


@dataclass(frozen=True)
class ParetoSampler:
    """Classical Pareto: ``P(X > x) = (scale / x) ** alpha`` for x >= scale, capped at ``cap``."""

    alpha: float
    scale: float
    cap: float = math.inf

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return np.minimum(self.scale * (1.0 + rng.pareto(self.alpha, size)), self.cap)

    def describe(self) -> str:
        cap = "" if math.isinf(self.cap) else f",cap={self.cap:g}"
        return f"pareto:alpha={self.alpha:g},scale={self.scale:g}{cap}"


class Slowdown:
    """Decides the extra delay of each request; call it from one thread (the compute thread)."""

    def __init__(
        self,
        sampler: DelaySampler,
        kind: str = "per-request",
        seed: int = 0,
        onset_rate: float = 0.05,
        period_s: float = 2.0,
    ) -> None:
        if kind not in KINDS:
            raise ConfigError(f"unknown slowdown kind {kind!r}; choose one of {', '.join(KINDS)}")
        if not (onset_rate > 0 and math.isfinite(onset_rate)):
            raise ConfigError(
                f"the slow-period onset rate must be a positive number per second, got {onset_rate}"
            )
        if not (period_s > 0 and math.isfinite(period_s)):
            raise ConfigError(f"the mean slow period must be a positive number of seconds, got {period_s}")
        self.sampler = sampler
        self.kind = kind
        self.onset_rate = onset_rate
        self.period_s = period_s
        self._rng = np.random.default_rng(seed)
        self._next_onset: float | None = None
        self._slow_until = -math.inf
        self._period_delay = 0.0

    def injected_delay(self, compute_s: float, now: float) -> float:
        """Seconds to sleep after a request that computed for ``compute_s``, at time ``now``."""
        if self.kind == "per-request":
            return max(0.0, float(self.sampler.sample(self._rng, 1)[0]) - compute_s)
        return self._period_delay if self._in_slow_period(now) else 0.0

    def _in_slow_period(self, now: float) -> bool:
        """Advance the slow/fast state machine to ``now`` (times must not go backwards)."""
        if self._next_onset is None:
            self._next_onset = now + self._rng.exponential(1.0 / self.onset_rate)
        while now >= self._next_onset:
            self._slow_until = self._next_onset + self._rng.exponential(self.period_s)
            self._period_delay = float(self.sampler.sample(self._rng, 1)[0])
            self._next_onset = self._slow_until + self._rng.exponential(1.0 / self.onset_rate)
        return now < self._slow_until

    def describe(self) -> str:
        """One line for logs and model metadata, so every result names its injected slowness."""
        if self.kind == "per-request":
            return f"{self.sampler.describe()} per-request"
        return (
            f"{self.sampler.describe()} per-instance "
            f"(onset {self.onset_rate:g}/s, mean period {self.period_s:g}s)"
        )


def parse_sampler(spec: str) -> DelaySampler | None:
    """A sampler from ``trace:PATH[:SCALE]``, ``bimodal[:SCALE]``, ``pareto:alpha=A,scale=XM[,cap=C]``
    or ``none`` (which returns None)."""
    name, _, rest = spec.strip().partition(":")
    if name == "none" and not rest:
        return None
    if name == "bimodal":
        return BimodalSampler(scale=_positive(rest or "1", "the bimodal scale"))
    if name == "trace":
        return _trace(rest)
    if name == "pareto":
        return _pareto(rest)
    raise ConfigError(
        f"unknown slowdown {spec!r}; use none, bimodal[:SCALE], trace:PATH[:SCALE] "
        "or pareto:alpha=A,scale=SECONDS[,cap=SECONDS]"
    )


def parse_slowdown(
    spec: str, kind: str = "per-request", seed: int = 0, onset_rate: float = 0.05, period_s: float = 2.0
) -> Slowdown | None:
    """A :class:`Slowdown` from a ``--slowdown`` spec, or None for ``none``."""
    sampler = parse_sampler(spec)
    return None if sampler is None else Slowdown(sampler, kind, seed, onset_rate, period_s)


def _trace(rest: str) -> TraceSampler:
    path_text, scale = rest, "1"
    head, sep, tail = rest.rpartition(":")
    if sep and head and _is_number(tail):  # otherwise the colon belongs to the path
        path_text, scale = head, tail
    if not path_text:
        raise ConfigError("trace slowdown needs a path: trace:PATH[:SCALE]")
    path = Path(path_text).expanduser()
    try:
        values = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ConfigError(
            f"latency trace {path} does not exist; give the path of a .npy array of seconds "
            "(e.g. ../shared/traces/cloud-latency-trace.npy) or use bimodal[:SCALE] instead"
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a NumPy .npy array: {exc}") from exc
    values = np.asarray(values, dtype=np.float64).ravel() if values.dtype.kind in "iuf" else None
    if values is None or not values.size or not np.isfinite(values).all() or values.min() < 0:
        raise ConfigError(f"{path} must hold a non-empty array of finite, non-negative latencies in seconds")
    return TraceSampler(values, _positive(scale, "the trace scale"), str(path))


def _pareto(rest: str) -> ParetoSampler:
    params: dict[str, float] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in ("alpha", "scale", "cap"):
            raise ConfigError(f"pareto takes alpha=A,scale=SECONDS[,cap=SECONDS]; cannot use {item!r}")
        params[key] = _positive(value, f"pareto {key}")
    missing = [k for k in ("alpha", "scale") if k not in params]
    if missing:
        raise ConfigError(f"pareto needs {' and '.join(missing)}: pareto:alpha=1.5,scale=0.01")
    return ParetoSampler(params["alpha"], params["scale"], params.get("cap", math.inf))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _positive(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{what} must be a number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{what} must be a positive finite number, got {text!r}")
    return value


_BURNER = """
import os, sys, time
fraction, period, parent = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
busy = fraction * period
while os.getppid() == parent:  # exit on our own if the worker dies without stopping us
    end = time.perf_counter() + busy
    while time.perf_counter() < end:
        pass
    time.sleep(period - busy)
"""


class CpuContention:
    """Real CPU contention: ``processes`` busy loops, each busy ``fraction`` of every ``period_s``.

    The burners inherit the worker's CPU affinity, so pin the worker (``taskset``) to make them
    share its cores on a machine with idle ones.
    """

    def __init__(self, fraction: float, processes: int = 1, period_s: float = 0.05) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ConfigError(f"--contention must be a CPU fraction in (0, 1], got {fraction}")
        if processes < 1:
            raise ConfigError(f"contention needs at least one process, got {processes}")
        self.fraction = fraction
        self.processes = processes
        self.period_s = period_s
        self._procs: list[subprocess.Popen] = []

    def start(self) -> None:
        args = [str(self.fraction), str(self.period_s), str(os.getpid())]
        self._procs = [
            subprocess.Popen([sys.executable, "-c", _BURNER, *args], stdin=subprocess.DEVNULL)
            for _ in range(self.processes)
        ]

    @property
    def pids(self) -> list[int]:
        """Process ids of the running burners (empty when stopped)."""
        return [proc.pid for proc in self._procs]

    def stop(self) -> None:
        for proc in self._procs:
            proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs = []

    def describe(self) -> str:
        return f"cpu contention {self.fraction:g} x {self.processes}"
