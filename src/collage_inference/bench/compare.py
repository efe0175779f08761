"""`collage bench`: every redundancy mode under the same stragglers, across loads and arrival patterns.

    collage bench --quick                    # ~4 min: bursts and Poisson arrivals at load 0.5
    collage bench                            # bursts and Poisson at loads 0.25, 0.5, 0.75
    collage bench --loads 0.3,0.6 --patterns poisson --scenario bimodal --out runs/mine

A run is one straggler scenario (the cloud trace at its own time scale when present, else the
bimodal model fitted to it) swept over load points: each arrival pattern (``burst``: k requests
at the same instant, as in the published experiments, the bursts Poisson; ``poisson``) at each
utilisation of the k s-CNN workers. At every point every mode runs on a fresh cluster with the
same seeds (see :mod:`~collage_inference.bench.harness`), the equal-cost baselines tuned at that
point; then :mod:`~collage_inference.bench.targets` judges the claims and
:mod:`~collage_inference.bench.report` writes ``results.json``, ``summary.md``, ``summary.html``
and the plots.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collage_inference.bench.harness import Harness, Images, RunSpec, load_images, serve_overrides
from collage_inference.bench.machine import BUSY_SHARE, code_version, cpu_busy, load_average, machine
from collage_inference.bench.report import console_summary, with_targets, write_report, write_results_page
from collage_inference.bench.scenarios import (
    DEFAULT_PATTERNS,
    OVERHEAD_SHARE_LIMIT,
    TRACE_PATH,
    LoadPoint,
    Scenario,
    at_scale,
    builtin_scenarios,
    load_points,
)
from collage_inference.bench.targets import PARM_GRID, with_ratios
from collage_inference.config import DEFAULT_MODELS_DIR, REPO_ROOT, load_config
from collage_inference.errors import CollageError, ConfigError
from collage_inference.modes import MODES, REISSUE_TARGETS
from collage_inference.parm import CONCAT_KS, ENCODERS

START_COST_S = 9.0  # cluster start, drain and stop (measured on 2 cores), for the time estimate only

# Where `--report RUN --write-docs` publishes a run: the README summarises that page.
RESULTS_PAGE = REPO_ROOT / "docs" / "bench-results.md"

DEFAULT_MODES = ("none", "equal", "replicate", "hedge", "replicate-all", "collage", "collage-2", "parm")


@dataclass(frozen=True)
class BenchConfig:
    """One `collage bench` run; see :func:`build_parser` for what each field means."""

    scenario: Scenario
    modes: tuple[str, ...] = DEFAULT_MODES
    grid: int = 3
    grids: tuple[int, ...] = ()  # extra collage rows at other S
    parity_ks: tuple[int, ...] = (4, 2)  # mode parm: one row per parity k
    parity_encoder: str = "concat"  # ParM's default encoder for images
    collage_policies: tuple[str, ...] = ("patient",)  # extra collage rows with these decoder policies
    patterns: tuple[str, ...] = DEFAULT_PATTERNS
    burst_size: int | None = None  # requests per burst; None: k, as in the published experiments
    loads: tuple[float, ...] = (0.25, 0.5, 0.75)
    pairs: tuple[tuple[str, float], ...] = ()  # (pattern, load) points instead of every combination
    requests: int = 630
    warmup: int = 126  # the front end's windows must see stragglers before the measured requests
    seed: int = 0
    sweep: tuple[float, ...] = (0.75, 1.25, 2.0)
    reissue_targets: tuple[str, ...] = REISSUE_TARGETS
    bracket: int = 1  # extra replicate runs allowed past a sweep end that holds the best p99
    quiet_wait: float = 60.0  # seconds to wait before a run for other work to leave the CPUs
    retry_busy: int = 1  # runs again a run during which other work took > BUSY_SHARE of the CPUs
    repeats: int = 1
    straggle_collage: bool = True
    models_dir: Path = DEFAULT_MODELS_DIR
    request_timeout: float = 5.0
    quick: bool = False
    command: str = "collage bench"
    backend: str = "local"  # local processes, or Ray Serve deployments (a private local Ray)
    trace: Path = TRACE_PATH  # where the trace scenario reads from (for the scale check)

    def __post_init__(self) -> None:
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise ConfigError(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
        if "none" not in self.modes:
            raise ConfigError("--modes must include none: the replicate sweep and the targets scale from it")
        if self.requests < 1 or self.warmup < 0 or self.repeats < 1:
            raise ConfigError("--requests and --repeats must be at least 1, --warmup at least 0")
        if "replicate" in self.modes and (not self.sweep or any(m <= 0 for m in self.sweep)):
            raise ConfigError(f"--sweep needs positive multiples of the fast-mode latency, got {self.sweep}")
        if any(p not in ("confident", "patient", "first") for p in self.collage_policies):
            raise ConfigError(
                f"collage policies are confident, patient or first, got {self.collage_policies}"
            )
        bad = [t for t in self.reissue_targets if t not in REISSUE_TARGETS]
        if bad or not self.reissue_targets:
            raise ConfigError(f"re-issue targets must be among {REISSUE_TARGETS}, got {self.reissue_targets}")
        if any(k not in CONCAT_KS for k in self.parity_ks) or not self.parity_ks:
            raise ConfigError(
                f"--parity-ks takes 2 and/or 4 (the shipped parity models), got {self.parity_ks}"
            )
        if self.parity_encoder not in ENCODERS:
            raise ConfigError(
                f"--parity-encoder is one of {', '.join(ENCODERS)}, got {self.parity_encoder!r}"
            )
        if self.burst_size is not None and self.burst_size < 1:
            raise ConfigError(f"--burst-size must be at least 1, got {self.burst_size}")
        if self.bracket < 0 or self.retry_busy < 0 or self.quiet_wait < 0:
            raise ConfigError("bracket, --retry-busy and --quiet-wait must not be negative")

    @property
    def k(self) -> int:
        return self.grid * self.grid

    @property
    def burst(self) -> int:
        return self.burst_size or self.k

    def points(self) -> list[LoadPoint]:
        service = self.scenario.service_s(self.seed)
        if self.pairs:
            return [
                p for pattern, load in self.pairs for p in load_points((pattern,), (load,), self.k, service)
            ]
        return load_points(self.patterns, self.loads, self.k, service)

    @property
    def extra_grids(self) -> tuple[int, ...]:
        """The S of the extra collage rows: those asked for, and S = 2 beside mode parm."""
        if "collage" not in self.modes:
            return ()
        wanted = [*self.grids, *([PARM_GRID] if "parm" in self.modes else [])]
        return tuple(sorted({g for g in wanted if g != self.grid}))

    def runs_per_point(self) -> int:
        per = {
            "replicate": len(self.sweep) * len(self.reissue_targets),
            "hedge": len(self.reissue_targets),
            "parm": len(self.parity_ks),
        }
        extra = len(self.collage_policies) + len(self.extra_grids)
        return sum(per.get(m, 1) for m in self.modes) + (extra if "collage" in self.modes else 0)

    def runs(self) -> int:
        """Load runs this config makes (bracketing may add up to ``bracket`` per point)."""
        return (len(self.points()) * self.runs_per_point() + 1) * self.repeats

    def estimate_s(self) -> float:
        per_point = sum((self.requests + self.warmup) / p.rate for p in self.points()) * self.runs_per_point()
        return (per_point + self.runs() * START_COST_S) * self.repeats


def reference_point(points: Sequence[LoadPoint]) -> LoadPoint:
    """Where the no-straggler reference runs: the middle Poisson load (or the middle point)."""
    poisson = [p for p in points if p.pattern == "poisson"] or list(points)
    return sorted(poisson, key=lambda p: p.load)[len(poisson) // 2]


def preflight(config: BenchConfig) -> None:
    """Fail in a second, not after minutes of runs: every model a run needs must exist."""
    point = config.points()[0]
    for mode in config.modes:
        load_config(
            overrides=serve_overrides(config, config.scenario, RunSpec(mode, config.grid, point))
        ).collage_models()
    load_config(overrides={"models_dir": config.models_dir}).scnn_model()


def run_bench(
    config: BenchConfig,
    log: Callable[[str], None] | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the reference and every load point; the ``results`` dict (targets included).
    ``progress`` gets the partial results after each point but the last, so an interrupted
    long run still leaves a report of what it finished."""
    preflight(config)
    before, busy_before = load_average(), cpu_busy()
    t0 = time.monotonic()
    images = load_images(config.seed, config.warmup + config.requests)
    harness = Harness(config, config.scenario, images, **({"log": log} if log else {}))
    points = config.points()
    reference = harness.reference(reference_point(points))
    measured: list[dict[str, Any]] = []
    for index, point in enumerate(points):
        measured.append(harness.point(point))
        if progress is not None and index < len(points) - 1:
            progress(assemble(config, images, reference, measured, t0, before, busy_before, done=False))
    results = assemble(config, images, reference, measured, t0, before, busy_before, done=True)
    if config.scenario.scale != 1.0:
        results["scale_check"] = scale_check(config, harness, results)
    return results


def scale_check(config: BenchConfig, harness: Harness, results: dict[str, Any]) -> dict[str, Any]:
    """At a time scale other than 1x, one load point again at 1x: the ratios must match within
    10%, or the shorter scale changed the regime (its fixed costs no longer small)."""
    scaled = results["points"][0]  # assembled: its ratios are in
    real = at_scale(config.scenario, config.trace, 1.0)
    point = load_points((scaled["pattern"],), (scaled["load"],), config.k, real.service_s(config.seed))[0]
    at_one = with_ratios(Harness(config, real, harness.images, harness.log).point(point))
    keys = ("baseline_over_collage_p99", "none_over_collage_p99")
    ours, theirs = scaled["ratios"]["collage"], at_one["ratios"]["collage"]
    gaps = {k: abs(ours[k] / theirs[k] - 1) for k in keys if ours.get(k) and theirs.get(k)}
    return {"pattern": point.pattern, "load": point.load, "scale": config.scenario.scale,
            "ratios": {k: [ours.get(k), theirs.get(k)] for k in keys},
            "within_10_percent": bool(gaps) and max(gaps.values()) <= 0.10}  # fmt: skip


def assemble(
    config: BenchConfig,
    images: Images,
    reference: dict[str, Any],
    points: list[dict[str, Any]],
    t0: float,
    before: list[float],
    busy_before: float | None,
    done: bool,
) -> dict[str, Any]:
    """The ``results`` dict of the runs so far (``partial`` until every point is done)."""
    after, busy_after = (load_average(), cpu_busy()) if done else ([], None)
    busy = any(b is not None and b > BUSY_SHARE for b in (busy_before, busy_after))
    sc = config.scenario
    ideal = sc.ideal(config.seed)
    share = reference["p50_ms"] / ideal["p50_one_ms"] if ideal["p50_one_ms"] > 0 else None
    results = {
        "schema": 2,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": config.command,
        "quick": config.quick,
        "partial": not done,
        "duration_s": round(time.monotonic() - t0, 1),
        "machine": {**machine(), "load_before": before, "load_after": after,
                    "cpu_busy_before": busy_before, "cpu_busy_after": busy_after, "busy": busy},
        "code_version": code_version(),
        "dataset": images.dataset,
        "scenario": {"name": sc.name, "spec": sc.spec, "kind": sc.kind, "description": sc.description,
                     "service_ms": round(sc.service_s(config.seed) * 1e3, 3), "ideal": ideal},
        "grid": config.grid,
        "parity_encoder": config.parity_encoder,
        "k": config.k,
        "patterns": list(config.patterns),
        "burst_size": config.burst,
        "loads": list(config.loads),
        "requests": config.requests,
        "warmup": config.warmup,
        "seed": config.seed,
        "straggle_collage": config.straggle_collage,
        "repeats": config.repeats,
        "replicate_sweep_multiples": list(config.sweep),
        "reference": reference,
        "overhead": {"share": round(share, 4) if share is not None else None,
                     "within_limit": share is not None and share <= OVERHEAD_SHARE_LIMIT},
        "points": points,
    }  # fmt: skip
    return with_targets(results)


# --- the CLI -------------------------------------------------------------------------------------

QUICK: dict[str, Any] = {
    "requests": 297,
    "warmup": 81,
    "modes": ("none", "replicate", "hedge", "replicate-all", "collage"),
    "sweep": (1.0, 2.0),
    "reissue_targets": ("idle",),
    "bracket": 0,
    "collage_policies": (),
}
QUICK_POINTS = (("burst", 0.5), ("poisson", 0.5))  # where the effect shows, one of each pattern


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _policies(text: str) -> tuple[str, ...]:
    return () if text.strip() == "none" else _names(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="collage bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="~4 min: one burst and one Poisson point, fewer runs")
    p.add_argument("--scenario", help="trace (default when the trace exists), bimodal or pareto")
    p.add_argument("--modes", help=f"comma list (default: {', '.join(DEFAULT_MODES)})")
    p.add_argument("--grid", type=int, default=3, help="collage side S of the comparison")
    p.add_argument("--grids", help="extra collage rows at these S (e.g. 2,4), each its own row")
    p.add_argument(
        "--policies",
        help="extra collage rows under other decoder policies: patient, first, or none (default patient)",
    )
    p.add_argument("--parity-ks", help="mode parm: a row per parity k, 2 and/or 4 (default 4,2)")
    p.add_argument("--parity-encoder", choices=ENCODERS, default="concat", help="mode parm's code")
    p.add_argument(
        "--arrival",
        "--patterns",
        dest="patterns",
        help="arrival patterns, a comma list of burst, poisson, constant (default: burst,poisson)",
    )
    p.add_argument("--burst-size", type=int, help="requests sent at once in a burst (default: k = S*S)")
    p.add_argument("--loads", help="utilisations of the k s-CNN workers (default 0.25,0.5,0.75)")
    p.add_argument("--requests", type=int, help="measured requests per run (default 630; --quick: 297)")
    p.add_argument("--warmup", type=int, help="unmeasured requests first (default 126; --quick: 81)")
    p.add_argument("--seed", type=int, default=0, help="arrival, image-order and straggler seed")
    p.add_argument("--sweep", help="replicate timeouts as multiples of p50(none) (default 0.75,1.25,2)")
    p.add_argument("--repeats", type=int, default=1, help="runs per setting; medians are reported")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="seconds to wait before each run for other work to leave the CPUs (0: do not wait)",
    )
    p.add_argument(
        "--retry-busy",
        type=int,
        default=1,
        help="times to run again a run during which other work took over a quarter of the CPUs",
    )
    p.add_argument("--trace", type=Path, default=TRACE_PATH, help="the cloud latency trace (.npy)")
    p.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="scale of the straggler delays (default 1: the trace's own time scale)",
    )
    p.add_argument(
        "--no-straggle-collage",
        dest="straggle_collage",
        action="store_false",
        help="do not inject delays into the collage worker (by default it straggles like the others)",
    )
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    p.add_argument("--backend", choices=("local", "ray"), default="local", help="where the cluster runs")
    p.add_argument("--out", type=Path, help="report folder (default runs/<timestamp>/)")
    p.add_argument(
        "--report",
        type=Path,
        metavar="RESULTS_JSON",
        help="run nothing: write the report of a stored results.json again, with the current targets",
    )
    p.add_argument(
        "--write-docs",
        action="store_true",
        help=f"with --report: put its figures in {RESULTS_PAGE.relative_to(REPO_ROOT)}",
    )
    return p  # fmt: skip


def config_from_args(args: argparse.Namespace, argv: Sequence[str]) -> BenchConfig:
    if args.time_scale <= 0:
        raise ConfigError(f"--time-scale must be positive, got {args.time_scale}")
    known = builtin_scenarios(args.trace, args.time_scale)
    name = args.scenario or next(iter(known))
    if name not in known:
        hint = f"; scenario trace needs {args.trace} (give --trace PATH)" if name == "trace" else ""
        raise ConfigError(f"unknown scenario {name!r}; choose from {', '.join(known)}{hint}")
    quick = QUICK if args.quick else {}
    return BenchConfig(
        scenario=known[name],
        modes=_names(args.modes) if args.modes else quick.get("modes", DEFAULT_MODES),
        grid=args.grid,
        grids=tuple(int(g) for g in _floats(args.grids)) if args.grids else (),
        parity_ks=tuple(int(k) for k in _floats(args.parity_ks)) if args.parity_ks else (4, 2),
        parity_encoder=args.parity_encoder,
        patterns=_names(args.patterns) if args.patterns else DEFAULT_PATTERNS,
        burst_size=args.burst_size,
        loads=_floats(args.loads) if args.loads else (0.25, 0.5, 0.75),
        pairs=QUICK_POINTS if args.quick and not (args.patterns or args.loads) else (),
        requests=args.requests or quick.get("requests", 630),
        warmup=args.warmup if args.warmup is not None else quick.get("warmup", 126),
        seed=args.seed,
        sweep=_floats(args.sweep) if args.sweep else quick.get("sweep", (0.75, 1.25, 2.0)),
        reissue_targets=quick.get("reissue_targets", REISSUE_TARGETS),
        collage_policies=_policies(args.policies)
        if args.policies
        else quick.get("collage_policies", ("patient",)),
        bracket=quick.get("bracket", 1),
        repeats=args.repeats,
        quiet_wait=args.quiet_wait,
        retry_busy=args.retry_busy,
        straggle_collage=args.straggle_collage,
        models_dir=args.models_dir,
        quick=args.quick,
        command=" ".join(["collage bench", *argv]),
        backend=args.backend,
        trace=args.trace,
    )


def default_out_dir() -> Path:
    return REPO_ROOT / "runs" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def execute(config: BenchConfig, out_dir: Path) -> dict[str, Any]:
    """Run, write the report folder, print the tables; the results."""
    preflight(config)
    print(
        f"collage bench: {config.runs()} runs, about {config.estimate_s() / 60:.1f} min; report in {out_dir}",
        file=sys.stderr,
        flush=True,
    )

    def partial(results: dict[str, Any]) -> None:
        write_report(results, out_dir)
        print(f"collage bench: partial report in {out_dir / 'summary.md'}", file=sys.stderr, flush=True)

    results = run_bench(config, progress=partial)
    files = write_report(results, out_dir)
    print(console_summary(results))
    if results["machine"]["busy"]:
        m = results["machine"]
        print(
            f"\nnote: the machine was busy ({m['cpu_busy_before'] or 0:.0%} of the CPUs busy before the "
            f"runs, {m['cpu_busy_after'] or 0:.0%} after, without this benchmark): do not trust the latencies"
        )
    print(
        f"\nreport: {out_dir / 'summary.md'}, as one page {out_dir / 'summary.html'} "
        f"({len(files)} files, {results['duration_s'] / 60:.1f} min)"
    )
    return results


def rerender(results_json: Path, out_dir: Path | None = None, page: Path | None = None) -> dict[str, Any]:
    """The report of a stored run again, judged by the current targets (no runs); with ``page``,
    its figures also go between that page's bench markers (plots copied beside it)."""
    try:
        stored = json.loads(results_json.read_text())
        results = with_targets({k: v for k, v in stored.items() if k != "targets"})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{results_json} is not a results.json of `collage bench`: {exc!r}") from exc
    out = out_dir or results_json.parent
    write_report(results, out)
    if page is not None:
        write_results_page(results, out, page)
    print(console_summary(results))
    print(f"\nreport: {out / 'summary.md'}, as one page {out / 'summary.html'}")
    return results


def main(argv: list[str] | None = None) -> int:
    """0 when every measured target is met, 1 when one is missed, 2 on a bad flag or setup."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        if args.report:
            results = rerender(args.report, args.out, RESULTS_PAGE if args.write_docs else None)
        else:
            results = execute(config_from_args(args, argv), args.out or default_out_dir())
    except CollageError as exc:
        print(f"collage bench: error: {exc}", file=sys.stderr)
        return 2
    return 1 if any(t["met"] is False for t in results["targets"]) else 0


if __name__ == "__main__":
    sys.exit(main())
