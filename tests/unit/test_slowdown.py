"""Straggler injection: sampler statistics against their stated distributions, the kinds'
semantics, spec parsing, and real CPU contention."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from collage_inference.errors import ConfigError
from collage_inference.slowdown import (
    BimodalSampler,
    ParetoSampler,
    Slowdown,
    TraceSampler,
    parse_sampler,
    parse_slowdown,
)

TRACE = Path(__file__).resolve().parents[3] / "shared" / "traces" / "cloud-latency-trace.npy"
N = 200_000


def constant(seconds: float) -> TraceSampler:
    return TraceSampler(np.array([seconds]))


def test_bimodal_matches_the_published_trace_statistics() -> None:
    x = BimodalSampler().sample(np.random.default_rng(0), N)
    q50, q90, q95, q99 = np.quantile(x, [0.5, 0.9, 0.95, 0.99])
    assert q50 == pytest.approx(0.138, abs=0.004)
    assert q90 == pytest.approx(0.189, abs=0.006)
    assert q95 == pytest.approx(0.215, abs=0.006)
    assert q99 == pytest.approx(0.702, abs=0.02)
    slow = x[x >= 0.45]
    assert len(slow) / N == pytest.approx(0.02, abs=0.002)
    assert slow.mean() == pytest.approx(0.706, abs=0.01)
    assert slow.min() >= 0.5 and slow.max() <= 1.04
    assert x[x < 0.45].mean() == pytest.approx(0.142, abs=0.002)


def test_bimodal_scale_keeps_the_shape() -> None:
    base = BimodalSampler().sample(np.random.default_rng(1), N)
    scaled = BimodalSampler(scale=0.1).sample(np.random.default_rng(1), N)
    np.testing.assert_allclose(scaled, base * 0.1)


@pytest.mark.skipif(not TRACE.exists(), reason="the shared cloud latency trace is not present")
def test_trace_sampler_reproduces_the_trace_quantiles() -> None:
    sampler = parse_sampler(f"trace:{TRACE}:0.5")
    assert isinstance(sampler, TraceSampler) and sampler.scale == 0.5
    x = sampler.sample(np.random.default_rng(2), N)
    qs = [0.5, 0.9, 0.95, 0.99]
    np.testing.assert_allclose(np.quantile(x, qs), 0.5 * np.quantile(sampler.values, qs), rtol=0.03)
    assert set(np.unique(x[:1000])) <= set(0.5 * sampler.values)


def test_pareto_has_the_stated_tail_and_mean() -> None:
    alpha, xm = 2.5, 0.01
    x = ParetoSampler(alpha, xm).sample(np.random.default_rng(3), N)
    assert x.min() >= xm
    assert x.mean() == pytest.approx(alpha * xm / (alpha - 1), rel=0.03)
    for t in (0.02, 0.05):
        assert (x > t).mean() == pytest.approx((xm / t) ** alpha, rel=0.1)
    capped = ParetoSampler(1.1, xm, cap=0.05).sample(np.random.default_rng(3), N)
    assert capped.max() == 0.05


def test_per_request_latency_is_max_of_compute_and_sample() -> None:
    slowdown = Slowdown(constant(0.2), "per-request")
    assert slowdown.injected_delay(0.05, 0.0) == pytest.approx(0.15)
    assert slowdown.injected_delay(0.2, 1.0) == 0.0
    assert slowdown.injected_delay(0.3, 2.0) == 0.0  # never negative: compute already took longer


def test_per_request_total_latency_distribution_is_the_sampler_above_compute() -> None:
    slowdown = Slowdown(BimodalSampler(scale=0.1), "per-request", seed=4)
    compute = 0.012
    totals = np.array([compute + slowdown.injected_delay(compute, i) for i in range(20_000)])
    assert totals.min() >= compute
    assert np.median(totals) == pytest.approx(0.0138, abs=0.0006)
    assert (totals >= 0.05).mean() == pytest.approx(0.02, abs=0.004)


def test_per_instance_slow_periods_have_the_stated_rate_and_length() -> None:
    rate, period = 0.1, 2.0
    slowdown = Slowdown(BimodalSampler(), "per-instance", seed=5, onset_rate=rate, period_s=period)
    times = np.arange(0.0, 50_000.0, 0.25)
    delays = np.array([slowdown.injected_delay(0.001, t) for t in times])
    slow = delays > 0
    # Alternating renewal process: fraction of time slow = period / (period + 1 / rate).
    assert slow.mean() == pytest.approx(period / (period + 1 / rate), rel=0.08)
    starts = np.flatnonzero(slow[1:] & ~slow[:-1]) + 1
    assert len(starts) / times[-1] == pytest.approx(1 / (period + 1 / rate), rel=0.1)
    # One delay per period: constant inside a run of slow samples.
    first = starts[0]
    run = delays[first : first + np.argmin(slow[first:])]
    assert len(run) >= 1 and np.all(run == run[0])


def test_same_seed_same_delays() -> None:
    def draws(seed: int) -> list[float]:
        slowdown = parse_slowdown("pareto:alpha=1.5,scale=0.01", seed=seed)
        return [slowdown.injected_delay(0.0, i) for i in range(50)]

    assert draws(7) == draws(7) and draws(7) != draws(8)


@pytest.mark.parametrize(
    ("spec", "describe"),
    [
        ("bimodal", "bimodal:1 per-request"),
        ("bimodal:0.1", "bimodal:0.1 per-request"),
        ("pareto:alpha=1.5,scale=0.01", "pareto:alpha=1.5,scale=0.01 per-request"),
        ("pareto:scale=0.01,alpha=2,cap=1", "pareto:alpha=2,scale=0.01,cap=1 per-request"),
    ],
)
def test_good_specs(spec: str, describe: str) -> None:
    assert parse_slowdown(spec).describe() == describe


def test_none_means_no_slowdown() -> None:
    assert parse_slowdown("none") is None and parse_sampler(" none ") is None


def test_trace_spec_with_and_without_scale(tmp_path: Path) -> None:
    path = tmp_path / "dir:with:colons" / "trace.npy"
    path.parent.mkdir()
    np.save(path, np.array([0.1, 0.2, 0.3]))
    assert parse_sampler(f"trace:{path}").scale == 1.0
    sampler = parse_sampler(f"trace:{path}:0.1")
    assert sampler.scale == 0.1 and sampler.source == str(path)
    assert (
        "per-instance (onset 0.5/s, mean period 3s)"
        in parse_slowdown(f"trace:{path}", "per-instance", onset_rate=0.5, period_s=3).describe()
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("gamma:1", "unknown slowdown"),
        ("none:1", "unknown slowdown"),
        ("bimodal:fast", "must be a number"),
        ("bimodal:-1", "positive"),
        ("bimodal:nan", "positive"),
        ("pareto", "needs alpha and scale"),
        ("pareto:alpha=2", "needs scale"),
        ("pareto:alpha=2,scale=0.1,shape=3", "cannot use 'shape=3'"),
        ("pareto:alpha", "cannot use 'alpha'"),
        ("pareto:alpha=0,scale=1", "positive"),
        ("trace:", "needs a path"),
        ("trace:/does/not/exist.npy:0.1", "does not exist"),
    ],
)
def test_bad_specs_say_what_to_do(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_slowdown(spec)


def test_bad_trace_files(tmp_path: Path) -> None:
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    np.save(tmp_path / "neg.npy", np.array([0.1, -1.0]))
    np.save(tmp_path / "text.npy", np.array(["a"]))
    with pytest.raises(ConfigError, match="not a NumPy"):
        parse_sampler(f"trace:{tmp_path / 'junk.npy'}")
    for name in ("neg.npy", "text.npy"):
        with pytest.raises(ConfigError, match="non-negative latencies"):
            parse_sampler(f"trace:{tmp_path / name}")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "sometimes"}, "unknown slowdown kind"),
        ({"onset_rate": 0}, "onset"),
        ({"period_s": -1}, "period"),
    ],
)
def test_bad_slowdown_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Slowdown(BimodalSampler(), **kwargs)


def test_worker_flags_build_its_settings() -> None:
    from collage_inference.serving.worker import build_parser, settings_from_args

    argv = [
        "--model",
        "m.onnx",
        "--slowdown",
        "bimodal:0.1",
        "--slowdown-kind",
        "per-instance",
        "--seed",
        "3",
    ]
    settings = settings_from_args(build_parser().parse_args(argv))
    assert settings.slowdown is not None and settings.slowdown.kind == "per-instance"
    assert (settings.slowdown.spec, settings.slowdown.seed, settings.port) == ("bimodal:0.1", 3, 8001)
    plain = settings_from_args(build_parser().parse_args(["--model", "m.onnx", "--max-body-mb", "1"]))
    assert plain.slowdown is None and plain.limits.max_body_bytes == 2**20
