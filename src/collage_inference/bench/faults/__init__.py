"""Faults and overload under steady load, each ending with an exact accounting of every request.

    collage faults                 # the fault suite: about 30 s of load plus start-up
    collage faults --soak 60       # then a minute at twice the sustainable rate

The fault suite (:mod:`.suite`) kills, hangs, garbles and moves workers of a collage cluster
under load through chaos proxies (:mod:`.chaos`); the soak (:mod:`.soak`) offers twice the
cluster's capacity. Both account for every request the client sent (:mod:`.accounting`): lost
and duplicated answers must be zero.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from collage_inference.bench.faults.accounting import fetch_metrics, format_accounting
from collage_inference.bench.faults.soak import format_soak, run_soak
from collage_inference.bench.faults.suite import PHASES, run_fault_suite
from collage_inference.bench.loadgen import environment
from collage_inference.config import DEFAULT_MODELS_DIR, REPO_ROOT
from collage_inference.errors import CollageError

__all__ = ["PHASES", "fetch_metrics", "format_accounting", "main", "run_fault_suite", "run_soak"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="collage faults", description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=60.0, help="offered load of the fault suite, req/s")
    p.add_argument("--seconds", type=float, default=30.0, help="length of the fault suite's load")
    p.add_argument("--soak", type=float, default=0.0, metavar="SECONDS", help="also soak for this long")
    p.add_argument("--no-faults", action="store_true", help="only the soak")
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    p.add_argument("--out", type=Path, help="report folder (default runs/faults-<time>)")
    return p


def main(argv: list[str] | None = None) -> int:
    """0 when nothing was lost or duplicated, 1 otherwise, 2 on a setup error."""
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # unwind: the cluster stops its processes
    out = args.out or REPO_ROOT / "runs" / f"faults-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    results: dict[str, Any] = {"environment": environment(), "date": datetime.now(UTC).isoformat()}
    clean = True
    try:
        if not args.no_faults:
            report = run_fault_suite(args.rate, args.seconds, args.models_dir)
            print(f"fault suite: {report.rate:g} req/s for {report.seconds:.0f} s")
            for phase in PHASES:
                print(f"  {phase.name:13s} {phase.what}")
            print(format_accounting(report.rows, report.duplicated))
            print(
                f"readiness statuses seen {report.ready_statuses}; degraded while the collage worker "
                f"was down: {report.degraded_seen}; all workers up again after "
                f"{report.recovered_s if report.recovered_s is None else round(report.recovered_s, 1)} s"
            )
            results["faults"] = report.to_dict()
            clean &= report.lost == 0 and report.duplicated == 0
        if args.soak > 0:
            soak = run_soak(args.soak, models_dir=args.models_dir)
            print("soak:\n" + format_soak(soak))
            results["soak"] = soak.to_dict()
            clean &= soak.accounting.n_lost == 0 and soak.duplicated == 0
    except CollageError as exc:
        print(f"collage faults: error: {exc}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"report: {out / 'results.json'}")
    return 0 if clean else 1
