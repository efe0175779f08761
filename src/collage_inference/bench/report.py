"""The report of a `collage bench` run: the target ratios, ``summary.md`` and the plots.

Everything here is a pure function of the ``results`` dict that :mod:`collage_inference.bench.compare`
writes as ``results.json``, so a report can be re-rendered from an old run's file (or from a
synthetic dict in a unit test) without running anything::

    write_report(json.loads(Path("runs/X/results.json").read_text()), Path("runs/X"))

Why the ratios are computed here and not in the harness: the claim a benchmark makes (the
targets below) must be checked the same way whether the numbers
come from a fresh run or a stored one.

| target | meaning |
| --- | --- |
| p99(replicate best) / p99(collage) >= 1.7 | beats a tuned fixed-timeout replication |
| p99(hedge) / p99(collage) >= 1.5 | beats hedging at the running p95 |
| p99(none) / p99(collage) >= 3 | the tail is cut, not trimmed |
| std(none) / std(collage) >= 3 | latency variation, the paper's second claim |
| p99(collage) / p99(replicate-all) <= 1.15 | close to full replication at 1/k of its cost |
| accuracy(s-CNN alone) - accuracy(collage) <= 0.3 points | rescued requests cost little accuracy |
| extra cost(collage) ~ 1/k | one collage worker per k s-CNN workers |

The s-CNN accuracy is the ``reference`` run's (mode none, no stragglers) on the same images.
A missed target gets a reason computed from the same run (:func:`miss_reasons`): the bound
that the straggler samples themselves set (``ideal``: one draw against the faster of two,
plus the measured serving overhead), replicate-all's measured figures (two independent draws
per request, the best any backup path can do), the re-issued calls per request and the mean
group size.
The plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MODE_ORDER = ("none", "equal", "replicate", "hedge", "replicate-all", "collage")
COST_TOLERANCE = 0.1  # "about 1/k": within 10% of 1/k


@dataclass(frozen=True)
class Target:
    """One claim: ``value op goal``. ``value`` is None when a mode it needs was not run."""

    name: str
    value: float | None
    goal: float
    op: str  # ">=", "<=" or "~" (within COST_TOLERANCE of goal)
    unit: str = "x"

    @property
    def met(self) -> bool | None:
        if self.value is None or not math.isfinite(self.value):
            return None
        if self.op == ">=":
            return self.value >= self.goal
        if self.op == "<=":
            return self.value <= self.goal
        return abs(self.value - self.goal) <= COST_TOLERANCE * self.goal

    @property
    def gap(self) -> str:
        """How far a missed target is from its goal, in words; empty when met or not measured."""
        if self.met is not False:
            return ""
        assert self.value is not None
        if self.op == ">=":
            short = self.goal - self.value
            return f"short by {short:.2f}{self.unit} ({short / self.goal:.0%} below the goal)"
        if self.op == "<=":
            over = self.value - self.goal
            return f"over by {over:.2f}{self.unit} ({over / self.goal:.0%} above the goal)"
        return f"off by {abs(self.value - self.goal):.3f} ({abs(self.value / self.goal - 1):.0%})"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "met": self.met, "gap": self.gap}


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b <= 0:
        return None
    return a / b


def _stat(modes: Mapping[str, Any], mode: str, key: str) -> float | None:
    value = modes.get(mode, {}).get(key)
    return None if value is None else float(value)


def compute_targets(scenario: Mapping[str, Any]) -> list[Target]:
    """The target ratios of one scenario's results (see the module docstring)."""
    modes = scenario["modes"]
    ref = scenario.get("reference") or {}
    p99 = {m: _stat(modes, m, "p99_ms") for m in MODE_ORDER}
    std = {m: _stat(modes, m, "std_ms") for m in MODE_ORDER}
    acc_ref, acc_collage = ref.get("accuracy"), _stat(modes, "collage", "accuracy")
    drop = None if acc_ref is None or acc_collage is None else (acc_ref - acc_collage) * 100
    k = int(scenario["grid"]) ** 2
    return [
        Target("p99 replicate (best) / p99 collage", _ratio(p99["replicate"], p99["collage"]), 1.7, ">="),
        Target("p99 hedge / p99 collage", _ratio(p99["hedge"], p99["collage"]), 1.5, ">="),
        Target("p99 none / p99 collage", _ratio(p99["none"], p99["collage"]), 3.0, ">="),
        Target("std none / std collage", _ratio(std["none"], std["collage"]), 3.0, ">="),
        Target("p99 collage / p99 replicate-all", _ratio(p99["collage"], p99["replicate-all"]), 1.15, "<="),
        Target("accuracy drop of collage vs s-CNN alone", drop, 0.3, "<=", " points"),
        Target("extra cost of collage", _stat(modes, "collage", "extra_cost"), 1.0 / k, "~", ""),
    ]


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def miss_reasons(scenario: Mapping[str, Any], targets: Sequence[Target]) -> dict[str, str]:
    """Why each missed target was missed, from the figures of the same run (name -> sentence)."""
    modes, ideal = scenario["modes"], scenario.get("ideal") or {}
    p99 = {m: _stat(modes, m, "p99_ms") for m in MODE_ORDER}
    std = {m: _stat(modes, m, "std_ms") for m in MODE_ORDER}
    collage = modes.get("collage", {})
    n = _num(collage.get("mean_group_size"))
    group = f"{n:.1f} requests per collage on average" if n else "partly filled collages"
    none_p50, one_p50 = _stat(modes, "none", "p50_ms"), _num(ideal.get("p50_one_ms"))
    overhead = max(none_p50 - one_p50, 0.0) if none_p50 is not None and one_p50 is not None else None
    rall = p99["replicate-all"]

    def versus_all(mode: str) -> str:
        r = _ratio(p99[mode], rall)
        return f"{mode} p99 is {r:.2f}x replicate-all's ({rall:.1f} ms)" if r else ""

    noisy = rall is not None and p99["collage"] is not None and rall > p99["collage"]
    if noisy or rall is None:
        bound_all = (
            f"replicate-all did worse than collage on this run (p99 {_fmt(rall)} against "
            f"{_fmt(p99['collage'])} ms): its 2k workers share the same CPUs, so this run's tails carry "
            "CPU contention as well as stragglers, and replicate-all bounds nothing here"
            if rall is not None
            else "replicate-all was not run, so there is no measured bound"
        )
    else:
        bound_all = ""

    def gap_to_all(mode: str) -> str:
        if bound_all:
            return bound_all
        return (
            f"{versus_all(mode)}; collage's p99 is at best about replicate-all's (two independent "
            f"draws), so the ratio is at most about {_fmt(_ratio(p99[mode], rall), 2)}x, and collage "
            f"sits at {_fmt(_ratio(p99['collage'], rall), 2)}x replicate-all"
        )

    backup = (
        f"collage's backup first waits for its group to close ({group}; the deadline is at most half "
        "the median primary latency) and then queues on the one collage worker, which straggles "
        "like the others, while replicate-all sends its second copy at once"
    )
    why: dict[str, str] = {}
    for t in targets:
        if t.met is not False:
            continue
        if t.name.startswith("p99 replicate"):
            rep = modes.get("replicate", {})
            calls = _num(rep.get("reissued_per_request"))
            reissued = f", re-issuing {calls:.2f} calls per request" if calls is not None else ""
            why[t.name] = (
                f"the best replicate timeout ({_fmt(rep.get('replicate_timeout_ms'), 0)} ms{reissued}) "
                "re-issues a straggler at a cost of little queueing at this load, so its p99 is about "
                f"that timeout plus one fresh call; {gap_to_all('replicate')}"
            )
        elif t.name.startswith("p99 hedge"):
            calls = _num(modes.get("hedge", {}).get("reissued_per_request"))
            reissued = f" ({calls:.2f} calls per request)" if calls is not None else ""
            why[t.name] = (
                f"hedge re-issues past the running p95{reissued}, so its p99 is about that p95 plus one "
                f"fresh call; {gap_to_all('hedge')}"
            )
        elif t.name.startswith("p99 none"):
            bound = ""
            if overhead is not None and ideal.get("p99_one_ms") and ideal.get("p99_min2_ms"):
                b = (ideal["p99_one_ms"] + overhead) / (ideal["p99_min2_ms"] + overhead)
                bound = (
                    f"the samples bound any backup to {b:.2f}x (p99 of one draw {ideal['p99_one_ms']:.1f} ms "
                    f"against the faster of two {ideal['p99_min2_ms']:.1f} ms, each plus the "
                    f"{overhead:.1f} ms serving overhead measured as p50(none) minus the samples' p50); "
                )
            why[t.name] = (
                f"{bound}{bound_all or 'measured, p99 none / p99 replicate-all is '}"
                f"{'' if bound_all else _fmt(_ratio(p99['none'], rall), 2) + 'x'}; {backup}"
            )
        elif t.name.startswith("std none"):
            bound = ""
            if ideal.get("std_one_ms") and ideal.get("std_min2_ms"):
                b = ideal["std_one_ms"] / ideal["std_min2_ms"]
                bound = (
                    f"the samples bound the ratio to {b:.2f}x (std of one draw against the faster of two); "
                )
            why[t.name] = (
                f"{bound}measured, std none / std replicate-all is "
                f"{_fmt(_ratio(std['none'], std['replicate-all']), 2)}x (the serving overhead's own jitter "
                f"adds to every mode's spread); {backup}"
            )
        elif t.name.startswith("p99 collage"):
            why[t.name] = backup
        elif t.name.startswith("accuracy"):
            share = collage.get("sources", {}).get("collage", 0.0)
            why[t.name] = (
                f"the collage answered {share:.1%} of requests, each at the collage-CNN's lower "
                "per-cell accuracy"
            )
        else:
            why[t.name] = "the collage mode ran with another number of collage workers than one per k"
    return why


def reasons_block(scenario: Mapping[str, Any], targets: Sequence[Target]) -> str:
    why = miss_reasons(scenario, targets)
    if not why:
        return ""
    return "Why the misses:\n\n" + "\n".join(f"- {name}: {text}." for name, text in why.items())


def ideal_line(scenario: Mapping[str, Any]) -> str:
    ideal = scenario.get("ideal")
    if not ideal:
        return ""
    return (
        f"The straggler samples alone (no serving overhead): p50 {ideal['p50_one_ms']:.1f} ms, p90 "
        f"{ideal['p90_one_ms']:.1f} ms, p99 {ideal['p99_one_ms']:.1f} ms; the faster of two independent "
        f"draws: p99 {ideal['p99_min2_ms']:.1f} ms "
        f"({ideal['p99_one_ms'] / ideal['p99_min2_ms']:.2f}x lower), "
        f"std {ideal['std_one_ms']:.1f} against {ideal['std_min2_ms']:.1f} ms "
        f"({ideal['std_one_ms'] / ideal['std_min2_ms']:.2f}x)."
    )


BUSY_RUN = 0.25  # other work above this share of the CPUs during a run: the run is flagged


def others_line(scenario: Mapping[str, Any]) -> str:
    """How much of the CPUs work other than the benchmark took during each run (when recorded)."""
    shares = [(name, _num(run.get("others_cpu_share"))) for name, run in _runs(scenario)]
    shares = [(name, v) for name, v in shares if v is not None]
    if not shares:
        return ""
    busy = [name for name, v in shares if v > BUSY_RUN]
    text = ", ".join(f"{name} {v:.0%}" for name, v in shares)
    flag = (
        f" Runs that shared the machine (over {BUSY_RUN:.0%}): {', '.join(busy)}; their latencies "
        "carry other work's CPU contention, not only stragglers."
        if busy
        else ""
    )
    return f"Other work on the CPUs during each run (share of all CPUs): {text}.{flag}"


def load_line(scenario: Mapping[str, Any]) -> str:
    """Re-issued calls and collage fill, from the front end's counters (when recorded)."""
    parts = []
    for mode in ("replicate", "hedge"):
        calls = _num(scenario["modes"].get(mode, {}).get("reissued_per_request"))
        if calls is not None:
            parts.append(f"{mode} re-issued {calls:.2f} s-CNN calls per request")
    n = _num(scenario["modes"].get("collage", {}).get("mean_group_size"))
    if n is not None:
        parts.append(f"collage groups held {n:.2f} requests on average (k = {scenario['grid'] ** 2})")
    return ("Extra work: " + "; ".join(parts) + ".") if parts else ""


# --- markdown ------------------------------------------------------------------------------------


def short_spec(spec: str) -> str:
    """A spec for titles: a trace's path shortened to its file name."""
    if spec.startswith("trace:"):
        path, sep, scale = spec[len("trace:") :].rpartition(":")
        return f"trace:{Path(path).name}:{scale}" if sep else f"trace:{Path(scale).name}"
    return spec


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _share(value: float | None) -> str:
    return "?" if value is None else f"{value:.0%}"


def _shares(shares: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.1%}" for k, v in sorted(shares.items())) or "n/a"


def _errors(errors: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "0"


def mode_table(scenario: Mapping[str, Any]) -> str:
    """One row per mode (the stragglers-off reference first): latency, cost, accuracy, sources."""
    head = (
        "| mode | p50 ms | p90 ms | p99 ms | p99.9 ms | mean ms | std ms | req/s | accuracy "
        "| extra cost | answered by | errors |\n" + "|---" * 12 + "|"
    )
    rows = [head]
    runs = [("reference (no stragglers)", scenario.get("reference"))]
    runs += [(m, scenario["modes"][m]) for m in MODE_ORDER if m in scenario["modes"]]
    for name, run in runs:
        if not run:
            continue
        if run.get("replicate_timeout_ms") is not None:
            name = f"{name} ({run['replicate_timeout_ms']:.0f} ms)"
        rows.append(
            f"| {name} | {_fmt(run['p50_ms'])} | {_fmt(run['p90_ms'])} | {_fmt(run['p99_ms'])} "
            f"| {_fmt(run['p999_ms'])} | {_fmt(run['mean_ms'])} | {_fmt(run['std_ms'])} "
            f"| {_fmt(run['throughput_rps'])} | {_fmt(run['accuracy'], 4)} | {_fmt(run['extra_cost'], 3)} "
            f"| {_shares(run.get('sources', {}))} | {_errors(run.get('errors', {}))} |"
        )
    return "\n".join(rows)


def target_table(targets: Sequence[Target]) -> str:
    rows = ["| target | value | goal | met | miss |", "|---|---|---|---|---|"]
    for t in targets:
        met = {True: "yes", False: "NO", None: "not run"}[t.met]
        value = "n/a" if t.value is None else f"{t.value:.3f}{t.unit}"
        goal = f"{t.op} {t.goal:.3g}{t.unit}" if t.op != "~" else f"~ 1/k = {t.goal:.3f}"
        rows.append(f"| {t.name} | {value} | {goal} | {met} | {t.gap} |")
    return "\n".join(rows)


def sweep_line(scenario: Mapping[str, Any]) -> str:
    rep = scenario["modes"].get("replicate")
    if not rep or not rep.get("sweep"):
        return ""
    points = ", ".join(
        f"{p['timeout_ms']:.0f} ms -> p99 {p['p99_ms']:.1f}"
        + (
            f" ({p['reissued_per_request']:.2f} re-issued/req)"
            if p.get("reissued_per_request") is not None
            else ""
        )
        for p in rep["sweep"]
    )
    return f"Replicate timeout sweep (best: {rep['replicate_timeout_ms']:.0f} ms): {points}."


def grid_table(sweep: Mapping[str, Any]) -> str:
    rows = [
        "| S | k | p50 ms | p99 ms | p99.9 ms | std ms | accuracy | s-CNN accuracy | extra cost "
        "| collage share |",
        "|---" * 10 + "|",
    ]
    for p in sweep["points"]:
        rows.append(
            f"| {p['grid']} | {p['grid'] ** 2} | {_fmt(p['p50_ms'])} | {_fmt(p['p99_ms'])} "
            f"| {_fmt(p['p999_ms'])} | {_fmt(p['std_ms'])} | {_fmt(p['accuracy'], 4)} "
            f"| {_fmt(p.get('scnn_accuracy'), 4)} | {_fmt(p['extra_cost'], 3)} "
            f"| {p.get('sources', {}).get('collage', 0.0):.1%} |"
        )
    return "\n".join(rows)


def render_summary(results: Mapping[str, Any]) -> str:
    """``summary.md``: the run's setting and machine, then per scenario a table and its targets."""
    m, load = results["machine"], results["load"]
    busy = "BUSY: latency figures are not trustworthy" if m.get("busy") else "idle"
    lines = [
        f"# collage bench, {results['date']}",
        "",
        f"- command: `{results['command']}` ({'quick run, ' if results.get('quick') else ''}"
        f"{results['duration_s'] / 60:.1f} min)",
        f"- code: {results['code_version']}",
        f"- machine: {m['platform']}, {m['cpus']} CPUs ({m.get('cpu_model', '?')}), python {m['python']}; "
        f"CPUs busy without this benchmark: {_share(m.get('cpu_busy_before'))} before, "
        f"{_share(m.get('cpu_busy_after'))} after: {busy}",
        f"- load: {load['arrival']} arrivals at {load['rate_rps']:g} req/s, {load['requests']} measured "
        f"requests per run after {load['warmup']} warm-up, arrival seed {load['seed']}; "
        f"straggler seed {results['slowdown_seed']} (worker i draws with seed + i, the same in every mode)",
        *(
            ["- PARTIAL: the run was still going; only the scenarios below are done"]
            if results.get("partial")
            else []
        ),
        f"- collage worker straggles too: {'yes' if results.get('straggle_collage') else 'no'}; "
        f"repeats per run: {results.get('repeats', 1)} (medians shown)",
    ]
    for sc in results["scenarios"]:
        lines += [
            "",
            f"## {sc['name']}: `{short_spec(sc['spec'])}` ({sc['kind']}), S = {sc['grid']}",
            "",
            sc.get("description", ""),
            "",
            mode_table(sc),
            "",
            sweep_line(sc),
            "",
            load_line(sc),
            "",
            others_line(sc),
            "",
            ideal_line(sc),
            "",
            target_table(targets := [Target(**_target_args(t)) for t in sc["targets"]]),
            "",
            reasons_block(sc, targets),
            "",
            f"![latency CDF](cdf-{sc['name']}.png) ![p99 and p99.9](tail-{sc['name']}.png)",
        ]
    sweep = results.get("grid_sweep")
    if sweep and sweep.get("points"):
        lines += [
            "",
            f"## Grid size (collage mode, scenario {sweep['scenario']})",
            "",
            grid_table(sweep),
            "",
            *(f"- {note}" for note in sweep.get("notes", [])),
            "",
            "![grid sweep](grid-sweep.png)",
        ]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)) + "\n"


def _target_args(t: Mapping[str, Any]) -> dict[str, Any]:
    return {k: t[k] for k in ("name", "value", "goal", "op", "unit")}


# --- plots ---------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display, in CI and over ssh
    import matplotlib.pyplot as plt

    return plt


def _runs(scenario: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    runs = [("reference", scenario["reference"])] if scenario.get("reference") else []
    return runs + [(m, scenario["modes"][m]) for m in MODE_ORDER if m in scenario["modes"]]


def plot_cdf(scenario: Mapping[str, Any], path: Path) -> None:
    """1 - CDF on a log axis, so the tail (p99, p99.9) gets as much room as the body."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, run in _runs(scenario):
        cdf = run.get("cdf") or {}
        pairs = [(ms, 1.0 - p) for p, ms in zip(cdf.get("p", []), cdf.get("ms", []), strict=True) if p < 1]
        if pairs:
            xs, ys = zip(*pairs, strict=True)
            ax.step(xs, ys, where="post", label=name, linestyle="--" if name == "reference" else "-")
    ax.set_yscale("log")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("1 - CDF (share of requests slower)")
    ax.set_title(f"{short_spec(scenario['spec'])} ({scenario['kind']}), S={scenario['grid']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tail(scenario: Mapping[str, Any], path: Path) -> None:
    """p99 and p99.9 bars per mode (the reference run without stragglers first)."""
    plt = _pyplot()
    runs = _runs(scenario)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = range(len(runs))
    for offset, key, label in ((-0.2, "p99_ms", "p99"), (0.2, "p999_ms", "p99.9")):
        ax.bar([x + offset for x in xs], [r[key] or 0.0 for _, r in runs], width=0.4, label=label)
    ax.set_xticks(list(xs), [n for n, _ in runs], rotation=20, fontsize=8)
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"tail latency per mode: {scenario['name']}, S={scenario['grid']}")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_grid_sweep(sweep: Mapping[str, Any], path: Path) -> None:
    """Tail latency and accuracy against S: the design-space trade-off of the collage side."""
    plt = _pyplot()
    points = sorted(sweep["points"], key=lambda p: p["grid"])
    grids = [p["grid"] for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    left.plot(grids, [p["p99_ms"] for p in points], "o-", label="p99")
    left.plot(grids, [p["p999_ms"] for p in points], "s-", label="p99.9")
    left.set_xlabel("collage side S")
    left.set_ylabel("latency (ms)")
    left.legend()
    right.plot(grids, [p["accuracy"] for p in points], "o-", label="collage mode")
    scnn = [p.get("scnn_accuracy") for p in points]
    if all(a is not None for a in scnn):
        right.plot(grids, scnn, "--", label="s-CNN alone (same images)")
    right.set_xlabel("collage side S")
    right.set_ylabel("end-to-end accuracy")
    right.legend()
    for ax in (left, right):
        ax.set_xticks(grids)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"grid size sweep, scenario {sweep['scenario']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- all of it ------------------------------------------------------------------------------------


def with_targets(results: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``results`` whose scenarios carry their computed ``targets``."""
    scenarios = [{**sc, "targets": [t.to_dict() for t in compute_targets(sc)]} for sc in results["scenarios"]]
    return {**results, "scenarios": scenarios}


def write_report(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Write ``results.json`` (targets included), ``summary.md`` and the PNGs; their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    full = with_targets(results)
    written = [out_dir / "results.json", out_dir / "summary.md"]
    written[0].write_text(json.dumps(full, indent=2, allow_nan=False, default=_json_default) + "\n")
    written[1].write_text(render_summary(full))
    for sc in full["scenarios"]:
        for prefix, plot in (("cdf", plot_cdf), ("tail", plot_tail)):
            path = out_dir / f"{prefix}-{sc['name']}.png"
            plot(sc, path)
            written.append(path)
    sweep = full.get("grid_sweep")
    if sweep and sweep.get("points"):
        written.append(out_dir / "grid-sweep.png")
        plot_grid_sweep(sweep, written[-1])
    return written


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def console_summary(results: Mapping[str, Any]) -> str:
    """What the CLI prints: per scenario the mode table and the target ratios."""
    full = with_targets(results) if "targets" not in results["scenarios"][0] else results
    parts = []
    for sc in full["scenarios"]:
        targets = [Target(**_target_args(t)) for t in sc["targets"]]
        head = f"\n== {sc['name']}: {short_spec(sc['spec'])} ({sc['kind']}), S = {sc['grid']}"
        parts += [head, mode_table(sc)]
        parts += [sweep_line(sc), load_line(sc), others_line(sc), ideal_line(sc), target_table(targets)]
        parts += [reasons_block(sc, targets)]
    sweep = full.get("grid_sweep")
    if sweep and sweep.get("points"):
        parts += [f"\n== grid size sweep (collage mode, {sweep['scenario']})", grid_table(sweep)]
    return "\n".join(p for p in parts if p)
