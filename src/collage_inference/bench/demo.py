"""`collage demo`: the whole idea in about four minutes, on the shipped models.

Two load points where the effect shows: bursts of k = 9 requests at once (the published
setting) and Poisson arrivals, both at half load. At each, the local cluster
starts once per mode (9 s-CNN workers and one 3x3 collage worker for collage mode), every mode
gets the same arrivals, images and straggler samples, and the table of p99 ratios is printed
against the targets. The stragglers come from the published cloud latency trace at its own
time scale when ``../shared/traces/`` holds it, and from the bimodal model fitted to that trace
otherwise, so the demo works on a fresh clone. The report folder (results.json, summary.md,
summary.html, plots) is the same as ``collage bench --quick`` writes; the last line says where it is.
"""

from __future__ import annotations

import sys
from pathlib import Path

from collage_inference.bench.compare import build_parser, config_from_args, execute
from collage_inference.bench.scenarios import TRACE_PATH
from collage_inference.config import DEFAULT_MODELS_DIR
from collage_inference.errors import CollageError


def demo_argv(models_dir: Path = DEFAULT_MODELS_DIR, trace_path: Path = TRACE_PATH) -> list[str]:
    """The quick comparison's flags: the trace when it exists, else the bimodal model."""
    scenario = "trace" if trace_path.is_file() else "bimodal"
    return ["--quick", "--scenario", scenario, "--models-dir", str(models_dir), "--trace", str(trace_path)]


def run_demo(out_dir: Path, models_dir: Path = DEFAULT_MODELS_DIR) -> int:
    """Run the demo comparison and write its report to ``out_dir``; 0 once the report is written
    (a missed target is printed, not an error: the demo shows, the benchmark asserts)."""
    argv = demo_argv(models_dir)
    try:
        config = config_from_args(build_parser().parse_args(argv), ["demo"])
    except CollageError as exc:
        print(f"collage demo: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"collage-inference demo: every redundancy mode, S = 3, stragglers from {config.scenario.spec}; "
        "bursts of 9 and Poisson arrivals, both at load 0.5\n",
        flush=True,
    )
    try:
        execute(config, out_dir)
    except CollageError as exc:
        print(f"collage demo: error: {exc}", file=sys.stderr)
        return 2
    print(f"the report is in {out_dir}; open {out_dir / 'summary.html'} in a browser")
    return 0
