"""The load generator's latency histogram (collage_inference.bench.stats) beside HdrHistogram's
Python port (the `hdrhistogram` package) on the same latencies: percentiles against the exact
order statistics, and the cost of recording and merging.

    .venv/bin/python scripts/histogram_vs_hdr.py [--samples 1000000]

Latencies are drawn from the shared cloud trace when it is present (else from a lognormal with
its shape), in seconds; HdrHistogram records integer nanoseconds with 3 significant digits
(0.1%), ours floats with its default 7 sub-bucket bits (0.39%).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from hdrh.histogram import HdrHistogram

from collage_inference.bench.stats import Histogram

TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "cloud-latency-trace.npy"
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def latencies(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if TRACE.exists():
        return rng.choice(np.load(TRACE).astype(np.float64), n)
    return 0.038 + rng.lognormal(-2.309, 0.311, n)


def hdr_of(values: np.ndarray) -> HdrHistogram:
    hdr = HdrHistogram(1, 3600 * 10**9, 3)
    for v in (values * 1e9).astype(np.int64).tolist():
        hdr.record_value(v)
    return hdr


def timed(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1_000_000)
    n = parser.parse_args().samples
    a, b = latencies(n, 1), latencies(n, 2)
    ours = Histogram()
    ours.record(a)
    hdr = hdr_of(a)
    exact = np.percentile(a, PERCENTILES, method="inverted_cdf")
    print(f"{n:,} latencies; relative error of each percentile against the exact order statistic")
    print(f"{'p':>6} {'exact ms':>10} {'ours':>9} {'hdrhistogram':>13}")
    for p, e in zip(PERCENTILES, exact, strict=True):
        mine = ours.percentile(p)
        theirs = hdr.get_value_at_percentile(p) / 1e9
        print(f"{p:>6} {e * 1e3:>10.3f} {abs(mine - e) / e:>9.3%} {abs(theirs - e) / e:>13.3%}")
    print(f"stated precision: ours {ours.relative_precision:.2%}, hdrhistogram 0.1% (3 significant digits)")
    record_ours = timed(lambda: Histogram().record(a))
    record_hdr = timed(lambda: hdr_of(a), repeats=1)
    single = Histogram()
    one_ours = timed(lambda: [single.record(v) for v in a[:20_000].tolist()], repeats=1) / 20_000
    other_ours, other_hdr = Histogram(), hdr_of(b)
    other_ours.record(b)
    merge_ours = timed(lambda: ours.copy().merge(other_ours))
    merge_hdr = timed(lambda: HdrHistogram(1, 3600 * 10**9, 3).add(other_hdr))
    print(
        f"record {n:,} (an array at once): ours {record_ours * 1e3:.1f} ms, hdrhistogram "
        f"{record_hdr * 1e3:.1f} ms (one call per value, the only way it records)"
    )
    print(
        f"record one value at a time: ours {one_ours * 1e6:.1f} us, "
        f"hdrhistogram {record_hdr / n * 1e6:.2f} us"
    )
    print(f"merge two histograms: ours {merge_ours * 1e3:.2f} ms, hdrhistogram {merge_hdr * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
