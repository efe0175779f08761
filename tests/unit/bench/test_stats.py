"""The histogram against exact numpy percentiles on known distributions, merging, edge cases."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest

from collage_inference.bench.stats import Histogram, LatencySummary
from collage_inference.errors import ConfigError

PS = [0, 1, 10, 25, 50, 75, 90, 99, 99.9, 99.99, 100]


def _samples(kind: str, n: int = 100_000) -> np.ndarray:
    rng = np.random.default_rng(42)
    if kind == "uniform":
        return rng.uniform(0.001, 0.5, n)  # 1 ms .. 500 ms
    if kind == "exponential":
        return rng.exponential(0.02, n) + 1e-5
    return rng.lognormal(mean=np.log(0.01), sigma=1.5, size=n)  # a long tail: ~1e-4 .. ~10 s


def _exact(values: np.ndarray, ps: list[float]) -> np.ndarray:
    """Inverted-CDF percentiles with exact rank arithmetic (numpy's ``method="inverted_cdf"`` is
    the same definition, but 0.999 * 100_000 rounds up to rank 99_901 in floating point)."""
    ordered = np.sort(values)
    ranks = [max(math.ceil(Fraction(str(p)) * len(values) / 100), 1) for p in ps]
    return ordered[np.array(ranks) - 1]


def test_exact_agrees_with_numpy_away_from_rounding() -> None:
    values = _samples("uniform", 1000)
    ps = [1, 25, 50, 90, 99, 100]
    np.testing.assert_array_equal(_exact(values, ps), np.percentile(values, ps, method="inverted_cdf"))


@pytest.mark.parametrize("kind", ["uniform", "exponential", "lognormal"])
def test_percentiles_are_within_the_precision_of_numpy(kind: str) -> None:
    values = _samples(kind)
    histogram = Histogram()
    histogram.record(values)
    exact = _exact(values, PS)
    got = histogram.percentiles(PS)
    np.testing.assert_allclose(got, exact, rtol=histogram.relative_precision, atol=0)
    assert histogram.percentile(0) == values.min() and histogram.percentile(100) == values.max()
    assert histogram.count == len(values)
    assert histogram.mean == pytest.approx(values.mean(), rel=1e-12)
    assert histogram.std == pytest.approx(values.std(), rel=1e-9)


def test_the_precision_is_about_half_a_percent_and_can_be_raised() -> None:
    assert Histogram().relative_precision == 2**-8
    fine = Histogram(sub_bucket_bits=10)
    values = _samples("lognormal", 20_000)
    fine.record(values)
    np.testing.assert_allclose(fine.percentiles([50, 99]), _exact(values, [50, 99]), rtol=2**-11)


def test_merge_equals_recording_everything() -> None:
    values = _samples("lognormal", 30_000)
    whole, parts = Histogram(), [Histogram() for _ in range(3)]
    whole.record(values)
    for part, chunk in zip(parts, [values[:10], values[10:20_000], values[20_000:]], strict=True):
        part.record(chunk)
    merged = Histogram()
    for part in [*parts, Histogram()]:  # merging an empty one changes nothing
        merged.merge(part)
    np.testing.assert_array_equal(merged.counts, whole.counts)
    assert (merged.count, merged.min, merged.max) == (whole.count, whole.min, whole.max)
    assert merged.mean == pytest.approx(whole.mean, rel=1e-12)
    assert merged.std == pytest.approx(whole.std, rel=1e-9)
    np.testing.assert_array_equal(merged.percentiles(PS), whole.percentiles(PS))
    copy = whole.copy()
    copy.record(1.0)
    assert copy.count == whole.count + 1


def test_one_by_one_equals_in_bulk() -> None:
    values = _samples("exponential", 500)
    bulk, single = Histogram(), Histogram()
    bulk.record(values)
    for v in values:
        single.record(float(v))
    np.testing.assert_array_equal(bulk.counts, single.counts)
    assert single.mean == pytest.approx(bulk.mean, rel=1e-12)
    assert single.std == pytest.approx(bulk.std, rel=1e-9)


def test_empty_histogram_and_summary_hold_nan() -> None:
    histogram = Histogram()
    assert histogram.count == 0 and math.isnan(histogram.percentile(50))
    assert math.isnan(histogram.mean) and math.isnan(histogram.std)
    summary = LatencySummary.from_histogram(histogram, 2.0, {"503": 4})
    assert summary.count == 0 and summary.throughput_rps == 0.0 and summary.error_count == 4
    assert math.isnan(summary.p99_ms) and math.isnan(summary.max_ms)
    doc = json.loads(json.dumps(summary.to_dict(), allow_nan=False))
    assert doc["p50_ms"] is None and doc["errors"] == {"503": 4}


def test_one_value_is_every_percentile_exactly() -> None:
    histogram = Histogram()
    histogram.record(0.0123)
    assert set(histogram.percentiles(PS).tolist()) == {0.0123}
    assert histogram.std == 0.0
    summary = LatencySummary.from_histogram(histogram, 0.5)
    assert summary.p50_ms == summary.p999_ms == summary.max_ms == summary.mean_ms == pytest.approx(12.3)
    assert summary.throughput_rps == 2.0 and dict(summary.errors) == {}


def test_out_of_range_values_clamp_to_the_end_buckets_but_keep_exact_ends() -> None:
    histogram = Histogram(min_value=1e-3, max_value=1.0)
    histogram.record([0.0, 1e-9, 5.0, 0.5])
    assert histogram.count == 4 and histogram.min == 0.0 and histogram.max == 5.0
    assert histogram.percentile(100) == 5.0 and histogram.percentile(25) <= 1e-3 * (1 + 2**-7)
    assert histogram.percentile(75) == pytest.approx(0.5, rel=2**-8)
    assert histogram.percentile(99) == pytest.approx(1.0, rel=2**-7)  # 5.0 counted in the top bucket


def test_summary_of_raw_latencies() -> None:
    values = _samples("uniform", 10_000)
    summary = LatencySummary.of(values, duration_s=10.0, errors={"timeout": 1, "429": 2})
    assert summary.count == 10_000 and summary.throughput_rps == 1000.0
    assert summary.p90_ms == pytest.approx(_exact(values, [90])[0] * 1e3, rel=2**-8)
    assert summary.max_ms == values.max() * 1e3
    assert list(summary.errors) == ["429", "timeout"]
    with pytest.raises(TypeError):
        summary.errors["x"] = 1  # type: ignore[index]


@pytest.mark.parametrize("bad", [[-1.0], [math.nan], [math.inf]])
def test_bad_values_are_refused(bad: list[float]) -> None:
    with pytest.raises(ValueError):
        Histogram().record(bad)
    with pytest.raises(ValueError):
        Histogram().percentiles([101])


def test_bad_layouts_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        Histogram(min_value=1.0, max_value=0.5)
    with pytest.raises(ConfigError):
        Histogram().merge(Histogram(sub_bucket_bits=5))


def test_percentiles_agree_with_hdrhistogram_within_the_stated_precision() -> None:
    from hdrh.histogram import HdrHistogram

    rng = np.random.default_rng(7)
    values = np.concatenate([0.038 + rng.lognormal(-2.3, 0.31, 20_000), rng.normal(0.7, 0.045, 400)])
    ours = Histogram()
    ours.record(values)
    hdr = HdrHistogram(1, 3600 * 10**9, 3)  # nanoseconds, 3 significant digits (0.1%)
    for v in (values * 1e9).astype(np.int64).tolist():
        hdr.record_value(v)
    for p in (50.0, 90.0, 99.0, 99.9):
        theirs = hdr.get_value_at_percentile(p) / 1e9
        assert abs(ours.percentile(p) - theirs) <= (ours.relative_precision + 0.001) * theirs, p
