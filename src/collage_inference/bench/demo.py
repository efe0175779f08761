"""`collage demo`: the whole idea in about two and a half minutes, on the shipped models.

It starts the local cluster once per redundancy mode (9 s-CNN workers and one 3x3 collage
worker for collage mode), sends every mode the same open-loop load, images and straggler
samples, and prints the table with the p99 ratios against their targets.
The stragglers come from the published cloud latency trace when ``../shared/traces/`` holds it
(scaled 0.1x so the demo is short), and from the bimodal model fitted to that trace otherwise,
so the demo works on a fresh clone. The report folder (results.json, summary.md, plots) is
the same as ``collage bench --quick`` writes; the last line says where it is.
"""

from __future__ import annotations

import sys
from pathlib import Path

from collage_inference.bench.compare import QUICK, TRACE_PATH, BenchConfig, builtin_scenarios, execute
from collage_inference.config import DEFAULT_MODELS_DIR
from collage_inference.errors import CollageError


def demo_config(models_dir: Path = DEFAULT_MODELS_DIR, trace_path: Path = TRACE_PATH) -> BenchConfig:
    """The quick comparison: the trace scenario when the trace exists, else the bimodal model."""
    scenarios = builtin_scenarios(trace_path, 0.1)
    scenario = scenarios.get("trace", scenarios["bimodal"])
    return BenchConfig(
        scenarios=(scenario,),
        grid=3,
        grids=QUICK["grids"],
        requests=QUICK["requests"],
        warmup=QUICK["warmup"],
        sweep=QUICK["sweep"],
        bracket=QUICK["bracket"],
        models_dir=models_dir,
        quick=True,
        command="collage demo",
    )


def run_demo(out_dir: Path, models_dir: Path = DEFAULT_MODELS_DIR) -> int:
    """Run the demo comparison and write its report to ``out_dir``; 0 once the report is written
    (a missed target is printed, not an error: the demo shows, the benchmark asserts)."""
    config = demo_config(models_dir)
    source = "the cloud latency trace" if config.scenarios[0].name == "trace" else "the bimodal model"
    print(
        f"collage-inference demo: every redundancy mode, S = 3, stragglers from {source} "
        f"({config.scenarios[0].spec}), {config.rate:g} req/s\n",
        flush=True,
    )
    try:
        execute(config, out_dir)
    except CollageError as exc:
        print(f"collage demo: error: {exc}", file=sys.stderr)
        return 2
    print(f"the report is in {out_dir}")
    return 0
