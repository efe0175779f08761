"""The report of a `collage bench` run: ``summary.md``, ``summary.html``, ``results.json`` and the plots.

Everything here is a pure function of the ``results`` dict, so a report can be re-rendered from
an old run's file (or from a synthetic dict in a unit test) without running anything::

    write_report(json.loads(Path("runs/X/results.json").read_text()), Path("runs/X"))

The report leads with the curves (p99 and std against load, one line per mode, one plot per
arrival pattern) and the table of targets; a missed target is followed by the figures of the
same run that bound it (:func:`collage_inference.bench.targets.explain`), never by canned prose.
The plots use matplotlib's Agg backend (no display needed). ``summary.html`` is the same
summary as one self-contained page (Python-Markdown renders it; the plots are embedded), to open
in a browser or attach to a ticket.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from collage_inference.bench.targets import Target, compute_targets, explain, parm_partner, with_ratios
from collage_inference.errors import ConfigError

MODE_ORDER = (
    "none",
    "equal",
    "replicate",
    "hedge",
    "replicate-all",
    "collage",
    "collage (patient)",
    "collage-2",
    "collage S=2",
    "parm k=4",
    "parm k=2",
)


def with_targets(results: Mapping[str, Any]) -> dict[str, Any]:
    """The results with each point's best baseline and ratios, and the run's targets."""
    points = [with_ratios(p) for p in results["points"]]
    out = {**results, "points": points}
    targets = compute_targets(out)
    out["targets"] = [{**t.to_dict(), "why": explain(out, t)} for t in targets]
    return out


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _modes(point: Mapping[str, Any]) -> list[str]:
    known = [m for m in MODE_ORDER if m in point["modes"]]
    return known + sorted(m for m in point["modes"] if m not in known)


def _setting(run: Mapping[str, Any]) -> str:
    if run.get("replicate_timeout_ms") is not None:
        return f"{run['replicate_timeout_ms']:.0f} ms, {run.get('reissue_to')}"
    if run.get("mode") == "hedge":
        return f"p95, {run.get('reissue_to')}"
    if run.get("mode", "").startswith("collage") and run.get("mean_group_size") is not None:
        skipped = f", {run['collages_skipped']:.0f} skipped" if run.get("collages_skipped") else ""
        return (
            f"{run['mean_group_size']:.1f} per collage, deadline {_fmt(run.get('group_deadline_ms'), 0)} ms "
            f"of W {_fmt(run.get('straggler_window_ms'), 0)} ms{skipped}"
        )
    return ""


def point_table(point: Mapping[str, Any]) -> str:
    """Every mode at one load point."""
    burst = point["pattern"] == "burst"
    head = "| mode | setting | p50 ms | p99 ms | std ms |" + (" burst p99 ms |" if burst else "")
    head += " accuracy | extra cost | re-issued/req | answered by | errors |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for mode in _modes(point):
        run = point["modes"][mode]
        sources = ", ".join(f"{k} {v:.1%}" for k, v in sorted(run.get("sources", {}).items()))
        errors = sum(run.get("errors", {}).values())
        cells = [mode, _setting(run), _fmt(run["p50_ms"]), _fmt(run["p99_ms"]), _fmt(run["std_ms"])]
        if burst:
            cells.append(_fmt((run.get("burst") or {}).get("p99_ms")))
        cells += [_fmt(run.get("accuracy"), 4), _fmt(run.get("extra_cost"), 3),
                  _fmt(run.get("reissued_per_request"), 2), sources, str(errors)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_table(results: Mapping[str, Any]) -> str:
    """The ratios of every load point, for every collage row."""
    lines = [
        "| pattern | load | req/s | row | best baseline | baseline / row p99 | none / row p99 "
        "| none / row std "
        "| row / replicate-all p99 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in results["points"]:
        base = p.get("best_baseline") or {}
        for row, r in p["ratios"].items():
            name = (
                f"{base.get('name', '-')} ({base.get('setting')})"
                if base.get("setting")
                else base.get("name", "-")
            )
            lines.append(
                f"| {p['pattern']} | {p['load']:g} | {p['rate_rps']:g} | {row} | {name} "
                f"| {_fmt(r['baseline_over_collage_p99'], 2)} | {_fmt(r['none_over_collage_p99'], 2)} "
                f"| {_fmt(r['none_over_collage_std'], 2)} | {_fmt(r['collage_over_replicate_all_p99'], 2)} |"
            )
    return "\n".join(lines)


def parm_table(results: Mapping[str, Any]) -> str:
    """ParM beside the collage at its k, per load point: p99, accuracy and how each backup did."""
    lines = [
        "| pattern | load | row | p99 ms | collage / row p99 | accuracy | collage minus row, points "
        "| answered by the backup | groups with 2+ unanswered |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in results["points"]:
        partner = parm_partner(p)
        for row in ([partner] if partner else []) + sorted(p.get("parm", {})):
            run, r = p["modes"][row], p.get("parm", {}).get(row, {})
            source = "parity" if row.startswith("parm") else "collage"
            share = (run.get("sources") or {}).get(source, 0.0)
            lines.append(
                f"| {p['pattern']} | {p['load']:g} | {row} | {_fmt(run['p99_ms'])} "
                f"| {_fmt(r.get('collage_over_parm_p99'), 2)} | {_fmt(run.get('accuracy'), 4)} "
                f"| {_fmt(r.get('accuracy_gain_points'), 2)} | {share:.1%} "
                f"| {_fmt(run.get('groups_2plus_unanswered'), 3)} |"
            )
    return "\n".join(lines)


def target_table(targets: list[Mapping[str, Any]]) -> str:
    lines = ["| target | value | goal | where | met | figures of the same run |", "|---|---|---|---|---|---|"]
    for t in targets:
        target = Target(t["name"], t["value"], t["goal"], t["op"], t["unit"], t["where"])
        met = {True: "yes", False: "NO", None: "not measured"}[target.met]
        value = "-" if t["value"] is None else f"{t['value']:.3f}{t['unit']}"
        why = t.get("why") or target.gap
        if target.met is False and target.gap:
            why = f"{target.gap}; {why}" if t.get("why") else target.gap
        lines.append(
            f"| {t['name']} | {value} | {t['op']} {t['goal']:.3g}{t['unit']} | {t['where']} | {met} | {why} |"
        )
    return "\n".join(lines)


def _scale_line(results: Mapping[str, Any]) -> list[str]:
    check = results.get("scale_check")
    if not check:
        return []
    measured = [(k.replace("_", " "), a, b) for k, (a, b) in check["ratios"].items() if a and b]
    pairs = ", ".join(f"{k} {a:.2f}x at {check['scale']:g}x, {b:.2f}x at 1x" for k, a, b in measured)
    verdict = "within 10%" if check["within_10_percent"] else "NOT within 10%: do not trust this scale"
    return [f"Scale check ({check['pattern']} at load {check['load']:g}): {pairs}; {verdict}."]


def render_summary(results: Mapping[str, Any]) -> str:
    """``summary.md``: the curves, the targets, then every load point's table."""
    sc, m = results["scenario"], results["machine"]
    ref = results.get("reference") or {}
    overhead = results.get("overhead") or {}
    parts = [
        f"# collage bench: {sc['name']}{' (partial)' if results.get('partial') else ''}",
        f"`{results['command']}` on {results['date']}, {results['duration_s'] / 60:.1f} min; "
        f"{m.get('cpu_model')}, {m.get('cpus')} CPUs, Python {m.get('python')}; {results['code_version']}.",
        f"Stragglers: {sc['description']} (`{sc['spec']}`, {sc['kind']}; the collage worker "
        f"{'straggles like the others' if results['straggle_collage'] else 'does not straggle'}). "
        f"Mean service time {sc['service_ms']:.1f} ms, so load u means u x {results['k']} / "
        f"{sc['service_ms'] / 1e3:.4f} s requests per second. S = {results['grid']}, "
        f"{results['requests']} measured requests per run after {results['warmup']} warm-up, seed "
        f"{results['seed']}; bursts of {results.get('burst_size', results['k'])} requests at once, the "
        "bursts Poisson.",
        f"Serving path alone (mode none, no stragglers): p50 {_fmt(ref.get('p50_ms'))} ms, accuracy "
        f"{_fmt(ref.get('accuracy'), 4)}; {_fmt(overhead.get('share'), 3)} of the median primary latency "
        f"({'within' if overhead.get('within_limit') else 'OVER'} the 5% a time scale may cost).",
        *_scale_line(results),
        "![p99 against load](p99-vs-load.png)\n![std against load](std-vs-load.png)",
        "## Targets",
        target_table(results["targets"]),
        "## Ratios at every load point",
        ratio_table(results),
    ]
    if any(p.get("parm") for p in results["points"]):
        parts += [
            "## ParM beside the collage at the same k",
            "ParM (`parm k=K`: k s-CNN workers' requests coded K at a time into one parity query, one "
            "parity worker) beside the collage at ParM's k = 4 (S = 2), on the same k s-CNN workers, "
            "arrivals, images and straggler samples. A ParM group recovers one unanswered request; "
            "the last column is the share of groups whose backup found two or more.",
            parm_table(results),
        ]
    for p in results["points"]:
        parts += [
            f"## {p['pattern']} at load {p['load']:g} ({p['rate_rps']:g} req/s offered)",
            point_table(p),
        ]
        rep = p["modes"].get("replicate", {})
        if rep.get("sweep"):
            sweep = ", ".join(
                f"{s['timeout_ms']:.0f} ms/{s['reissue_to']} -> {_fmt(s['p99_ms'])} "
                f"({_fmt(s.get('reissued_per_request'), 2)} re-issued/req)"
                for s in rep["sweep"]
            )
            parts.append(f"Replicate sweep (p99 ms): {sweep}.")
        others = {mode: run.get("others_cpu_share") for mode, run in p["modes"].items()}
        busy = [f"{mode} {share:.0%}" for mode, share in others.items() if share and share > 0.05]
        parts.append(f"Other work on the CPUs during a run: {', '.join(busy) if busy else 'at most 5%'}.")
    ideal = sc.get("ideal") or {}
    if ideal:
        parts.append(
            f"The straggler samples alone: p50 {ideal['p50_one_ms']:.1f}, p90 {ideal['p90_one_ms']:.1f}, "
            f"p99 {ideal['p99_one_ms']:.1f} ms; the faster of two independent draws: p99 "
            f"{ideal['p99_min2_ms']:.1f} ms (no queue, no serving path)."
        )
    return "\n\n".join(parts) + "\n"


def results_block(results: Mapping[str, Any]) -> str:
    """The published figures of a run: where and how it ran, the curves (the PNGs lie beside
    the page), the targets and the ratios."""
    m, sc = results["machine"], results["scenario"]
    when = results["date"].replace("T", " ").replace("+00:00", " UTC")
    where = f"{m.get('cpu_model')}, {m.get('cpus')} vCPUs, Python {m.get('python')}"
    setting = (
        f"stragglers: {sc['description'][:1].lower()}{sc['description'][1:]} S = {results['grid']}, "
        f"{results['requests']} measured requests per run after {results['warmup']} warm-up"
    )
    curves = "\n".join(f"![{key} against load](bench-{key}-vs-load.png)" for key in ("p99", "std"))
    head = f"`{results['command']}` on {when}, {results['duration_s'] / 60:.0f} minutes: {where}; {setting}."
    return "\n\n".join([head, curves, target_table(results["targets"]), ratio_table(results)])


def write_results_page(results: Mapping[str, Any], run_dir: Path, page: Path) -> None:
    """Put the run's figures between the bench markers of ``page`` and its plots beside it."""
    for name in ("p99-vs-load.png", "std-vs-load.png"):
        (page.parent / f"bench-{name}").write_bytes((run_dir / name).read_bytes())
    text = page.read_text()
    if RESULTS_START not in text or RESULTS_END not in text:
        raise ConfigError(f"{page} lacks the {RESULTS_START} ... {RESULTS_END} markers")
    head, rest = text.split(RESULTS_START, 1)
    page.write_text(
        f"{head}{RESULTS_START}\n{results_block(results)}\n{RESULTS_END}{rest.split(RESULTS_END, 1)[1]}"
    )


RESULTS_START, RESULTS_END = "<!-- bench:start -->", "<!-- bench:end -->"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_against_load(results: Mapping[str, Any], key: str, path: Path) -> None:
    """``key`` (p99_ms or std_ms) against load, one line per mode, one panel per pattern."""
    plt = _pyplot()
    patterns = list(dict.fromkeys(p["pattern"] for p in results["points"]))
    fig, axes = plt.subplots(1, len(patterns), figsize=(6 * len(patterns), 4.2), squeeze=False)
    for ax, pattern in zip(axes[0], patterns, strict=True):
        points = sorted((p for p in results["points"] if p["pattern"] == pattern), key=lambda p: p["load"])
        modes = list(dict.fromkeys(m for p in points for m in _modes(p)))
        for mode in modes:
            xs = [p["load"] for p in points if mode in p["modes"]]
            ys = [p["modes"][mode][key] for p in points if mode in p["modes"]]
            style = "-o" if mode.startswith("collage") else "--."
            ax.plot(xs, ys, style, label=mode, linewidth=2.2 if mode == "collage" else 1.2)
        ax.set_title(f"{pattern} arrivals")
        ax.set_xlabel("utilisation of the k s-CNN workers")
        ax.set_ylabel(key.replace("_ms", " latency, ms"))
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """``results.json``, ``summary.md``, the two plots and ``summary.html`` in ``out_dir``; the
    paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "results.json", out_dir / "summary.md"]
    files[0].write_text(json.dumps(results, indent=1, default=_json_default))
    summary = render_summary(results)
    files[1].write_text(summary)
    if results["points"]:
        for key, name in (("p99_ms", "p99-vs-load.png"), ("std_ms", "std-vs-load.png")):
            plot_against_load(results, key, out_dir / name)
            files.append(out_dir / name)
    files.append(out_dir / "summary.html")
    files[-1].write_text(render_html(summary, out_dir))
    return files


_PAGE_STYLE = """body{font:15px/1.45 system-ui,sans-serif;max-width:75em;margin:2em auto;padding:0 1em}
table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px}
th{background:#f3f3f3}td:not(:first-child){text-align:right}img{max-width:100%}code{background:#f3f3f3}"""


def render_html(summary_md: str, out_dir: Path) -> str:
    """``summary.md`` as one page with no outside references: each plot it names in ``out_dir``
    embedded as a data URI."""
    import base64
    import html
    import re

    import markdown

    body = markdown.markdown(summary_md, extensions=["tables"])

    def embed(match: re.Match) -> str:
        path = out_dir / html.unescape(match.group(1))
        if not path.is_file():
            return match.group(0)
        return f'src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"'

    body = re.sub(r'src="([^":/]+\.png)"', embed, body)
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>collage bench report</title>'
        f"<style>{_PAGE_STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # NumPy scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def console_summary(results: Mapping[str, Any]) -> str:
    """What the terminal shows at the end: p99 per mode and point, then the targets."""
    lines = []
    for p in results["points"]:
        rows = ", ".join(f"{m} {p['modes'][m]['p99_ms']:.0f}" for m in _modes(p))
        base = p.get("best_baseline") or {}
        r = p["ratios"].get("collage", {})
        lines.append(
            f"{p['pattern']:>7} load {p['load']:<4g} p99 ms: {rows}; best baseline {base.get('name')} -> "
            f"baseline/collage {_fmt(r.get('baseline_over_collage_p99'), 2)}x, "
            f"none/collage {_fmt(r.get('none_over_collage_p99'), 2)}x"
        )
    lines.append("")
    for t in results["targets"]:
        met = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        value = "-" if t["value"] is None else f"{t['value']:.3f}{t['unit']}"
        lines.append(f"{t['name']}: {value} ({t['op']} {t['goal']:.3g}{t['unit']}, {t['where']}) {met}")
    return "\n".join(lines)
