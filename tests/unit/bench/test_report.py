"""The bench report from a synthetic results dict: the targets, the ratios, every file written."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from collage_inference.bench.report import console_summary, render_summary, with_targets, write_report
from collage_inference.bench.targets import Target, best_baseline
from collage_inference.errors import ConfigError


def run(p99: float, std: float = 20.0, accuracy: float = 0.93, extra_cost: float = 0.0, **more: Any) -> dict:
    return {"answered": 630,
        "p50_ms": 150.0, "p90_ms": 200.0, "p99_ms": p99, "p999_ms": p99 * 1.2, "mean_ms": 160.0,
        "std_ms": std, "max_ms": p99 * 1.5, "throughput_rps": 30.0, "accuracy": accuracy,
        "extra_cost": extra_cost, "sources": {"primary": 0.95, "collage": 0.05}, "errors": {},
        "cdf": {"p": [0.0, 1.0], "ms": [100.0, p99 * 1.5]}, **more,
    }  # fmt: skip


def point(pattern: str, load: float, collage: float, none: float = 800.0, replicate: float = 600.0) -> dict:
    k = 9
    return {
        "pattern": pattern,
        "load": load,
        "rate_rps": load * 9 / 0.15,
        "modes": {
            "none": run(none, std=120.0),
            "equal": run(none * 0.95, extra_cost=1 / k),
            "replicate": run(replicate, extra_cost=1 / k, mode="replicate", replicate_timeout_ms=300.0,
                             reissue_to="idle", sweep=[{"timeout_ms": 300.0, "reissue_to": "idle",
                                                        "p99_ms": replicate, "reissued_per_request": 0.1}]),
            "hedge": run(replicate * 1.1, extra_cost=1 / k, mode="hedge", reissue_to="idle"),
            "replicate-all": run(collage * 0.9, extra_cost=1.0),
            "collage": run(collage, std=50.0, accuracy=0.928, extra_cost=1 / k, mode="collage",
                           mean_group_size=8.5, group_deadline_ms=230.0),
            "collage-2": run(collage * 0.8, std=45.0, extra_cost=2 / k, mode="collage-2"),
        },
    }  # fmt: skip


def results(points: list[dict] | None = None) -> dict:
    return {
        "schema": 2,
        "date": "2026-11-29T06:00:00+00:00",
        "command": "collage bench",
        "quick": False,
        "partial": False,
        "duration_s": 600.0,
        "machine": {"python": "3.11", "cpus": 2, "cpu_model": "test", "busy": False},
        "code_version": "collage-inference 0.1.0",
        "scenario": {"name": "trace", "spec": "trace:x.npy:1", "kind": "per-request", "description": "fake",
                     "service_ms": 150.0, "ideal": {"p50_one_ms": 138.0, "p90_one_ms": 189.0,
                                                    "p99_one_ms": 702.0, "p99_min2_ms": 189.0}},
        "grid": 3, "k": 9, "requests": 630, "warmup": 126, "seed": 0, "straggle_collage": True,
        "reference": run(8.0, std=2.0, accuracy=0.93),
        "overhead": {"share": 0.058, "within_limit": False},
        "points": points if points is not None else [
            point("burst", 0.25, 400.0), point("burst", 0.5, 300.0, replicate=500.0),
            point("poisson", 0.25, 250.0, none=700.0, replicate=260.0),
            point("poisson", 0.5, 280.0, none=700.0),
        ],
    }  # fmt: skip


def targets(res: dict) -> dict[str, dict]:
    return {t["name"]: t for t in with_targets(res)["targets"]}


def test_the_best_baseline_is_the_lowest_p99_of_the_equal_cost_modes() -> None:
    base = best_baseline(point("burst", 0.5, 300.0, replicate=500.0))
    assert base["name"] == "replicate" and base["p99_ms"] == 500.0
    assert base["setting"] == "timeout 300 ms, re-issue to idle"
    p = point("burst", 0.5, 300.0)
    p["modes"]["hedge"]["p99_ms"] = 100.0
    assert best_baseline(p)["name"] == "hedge"


def test_targets_take_the_best_load_per_pattern_and_the_worst_high_load() -> None:
    t = targets(results())
    burst = t["best equal-cost baseline / collage, p99, bursts, best load"]
    assert burst["value"] == pytest.approx(500 / 300) and burst["where"] == "burst at load 0.5"
    assert burst["met"] is True
    poisson = t["best equal-cost baseline / collage, p99, Poisson, best load"]
    assert poisson["value"] == pytest.approx(600 / 280) and poisson["where"] == "poisson at load 0.5"
    high = t["none / collage, p99, every load >= 0.5 (worst)"]
    assert high["value"] == pytest.approx(700 / 280) and high["where"] == "poisson at load 0.5"
    assert t["none / collage, std, every load >= 0.5 (worst)"]["value"] == pytest.approx(120 / 50)
    assert t["collage / replicate-all, p99, every load (worst)"]["value"] == pytest.approx(1 / 0.9)
    drop = t["accuracy drop of collage vs s-CNN alone (pooled)"]
    assert drop["value"] == pytest.approx(0.2) and drop["met"] is True
    assert drop["where"].startswith("4 load points, ")
    assert t["extra cost of collage"]["value"] == pytest.approx(1 / 9) and t["extra cost of collage"]["met"]


def test_a_missed_target_names_the_figures_that_bound_it() -> None:
    res = results([point("burst", 0.5, 450.0, replicate=500.0), point("poisson", 0.5, 280.0)])
    burst = targets(res)["best equal-cost baseline / collage, p99, bursts, best load"]
    assert burst["met"] is False
    assert "replicate-all" in burst["why"] and "8.5 of k = 9" in burst["why"] and "collage-2" in burst["why"]


def test_collage_2_never_counts_for_collage() -> None:
    p = point("burst", 0.5, 450.0, replicate=500.0)
    p["modes"]["collage-2"]["p99_ms"] = 10.0
    res = with_targets(results([p]))
    assert res["targets"][0]["value"] == pytest.approx(500 / 450)
    assert res["points"][0]["ratios"]["collage-2"]["baseline_over_collage_p99"] == pytest.approx(50.0)


def test_missing_patterns_are_not_measured_rather_than_failed() -> None:
    t = targets(results([point("burst", 0.5, 300.0)]))
    poisson = t["best equal-cost baseline / collage, p99, Poisson, best load"]
    assert poisson["value"] is None and poisson["met"] is None


def test_target_gaps_say_by_how_much() -> None:
    assert Target("x", 1.3, 1.5, ">=").gap.startswith("short by 0.20x")
    assert Target("x", 1.5, 1.3, "<=").gap.startswith("over by 0.20x")
    assert Target("x", 1.3, 1.3, ">=").met is True and Target("x", None, 1.0, ">=").met is None


def test_write_report_writes_every_file_and_the_summary_leads_with_curves_and_targets(tmp_path: Path) -> None:
    res = with_targets(results())
    files = write_report(res, tmp_path)
    assert {f.name for f in files} == {
        "results.json", "summary.md", "summary.html", "p99-vs-load.png", "std-vs-load.png"
    }  # fmt: skip
    assert all(f.stat().st_size > 0 for f in files)
    page = (tmp_path / "summary.html").read_text()  # one page: the tables, the plots inside it
    assert page.startswith("<!doctype html>") and page.count("<table>") == render_summary(res).count("\n\n|")
    assert page.count('src="data:image/png;base64,') == 2 and "p99-vs-load.png" not in page
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert json.loads((tmp_path / "results.json").read_text())["points"][0]["best_baseline"]["name"]
    summary = render_summary(res)
    assert summary.index("p99-vs-load.png") < summary.index("## Targets") < summary.index("## burst at load")
    assert "OVER the 5%" in summary and "burst p99 ms" in summary
    text = console_summary(res)
    assert "baseline/collage" in text and "best equal-cost baseline / collage" in text


def test_the_accuracy_drop_pools_every_load_point_and_names_the_worst() -> None:
    points = [point("burst", 0.5, 300.0), point("poisson", 0.5, 280.0)]
    points[0]["modes"]["collage"]["accuracy"] = 0.925  # 0.5 points below the reference
    points[1]["modes"]["collage"]["accuracy"] = 0.931  # 0.1 above
    drop = targets(results(points))["accuracy drop of collage vs s-CNN alone (pooled)"]
    assert drop["value"] == pytest.approx(0.2) and drop["met"] is True
    assert "worst 0.50 at burst at load 0.5" in drop["where"]


def test_a_stored_run_is_judged_again_by_the_current_targets(tmp_path: Path, capsys) -> None:
    from collage_inference.bench.compare import main

    stored = {**with_targets(results()), "targets": [{"name": "an old target"}]}
    (tmp_path / "results.json").write_text(json.dumps(stored))
    assert main(["--report", str(tmp_path / "results.json")]) in (0, 1)
    again = json.loads((tmp_path / "results.json").read_text())
    assert (
        "an old target" not in {t["name"] for t in again["targets"]} and (tmp_path / "summary.md").is_file()
    )
    assert main(["--report", str(tmp_path / "missing.json")]) == 2
    assert "not a results.json" in capsys.readouterr().err


def test_the_results_block_goes_between_its_markers_with_the_plots_beside(tmp_path: Path) -> None:
    from collage_inference.bench.report import write_results_page

    res = with_targets(results())
    run_dir = tmp_path / "run"
    write_report(res, run_dir)
    page = tmp_path / "docs" / "bench-results.md"
    page.parent.mkdir()
    page.write_text("intro\n<!-- bench:start -->\nold\n<!-- bench:end -->\nrest\n")
    write_results_page(res, run_dir, page)
    text = page.read_text()
    assert text.startswith("intro\n<!-- bench:start -->\n`collage bench` on 2026-11-29 06:00:00 UTC")
    assert "old" not in text and text.endswith("<!-- bench:end -->\nrest\n")
    assert "](bench-p99-vs-load.png)" in text and (page.parent / "bench-std-vs-load.png").is_file()
    page.write_text("no markers\n")
    with pytest.raises(ConfigError, match="lacks the"):
        write_results_page(res, run_dir, page)


def test_a_shorter_time_scale_reports_its_check_at_1x() -> None:
    res = with_targets(results())
    ratios = {"none_over_collage_p99": [2.0, 1.6], "baseline_over_collage_p99": [None, 1.1]}
    res["scale_check"] = {
        "pattern": "burst",
        "load": 0.5,
        "scale": 0.5,
        "within_10_percent": False,
        "ratios": ratios,
    }
    line = next(ln for ln in render_summary(res).splitlines() if ln.startswith("Scale check"))
    assert "none over collage p99 2.00x at 0.5x, 1.60x at 1x" in line and "NOT within 10%" in line
    assert "baseline" not in line


def with_parm(p: dict, collage_s2: float, parm4: float, parm2: float, accuracy4: float = 0.92) -> dict:
    """A load point with ParM's rows and the collage at its k = 4 (S = 2) beside them."""
    modes = dict(p["modes"])
    cost = 1 / 9
    collage, parity = {"primary": 0.9, "collage": 0.1}, {"primary": 0.95, "parity": 0.03}
    modes["collage S=2"] = run(collage_s2, accuracy=0.93, extra_cost=cost, mode="collage", grid=2,
                               sources=collage, groups_2plus_unanswered=0.04)  # fmt: skip
    modes["parm k=4"] = run(parm4, accuracy=accuracy4, extra_cost=cost, mode="parm", grid=3,
                            sources=parity, groups_2plus_unanswered=0.05)  # fmt: skip
    modes["parm k=2"] = run(parm2, accuracy=0.925, extra_cost=1 / 9, mode="parm", grid=3)
    return {**p, "modes": modes}


def test_parm_is_judged_beside_the_collage_at_its_k() -> None:
    res = results([
        with_parm(point("burst", 0.5, 300.0), collage_s2=400.0, parm4=500.0, parm2=450.0),
        with_parm(point("poisson", 0.5, 280.0), collage_s2=300.0, parm4=250.0, parm2=260.0, accuracy4=0.94),
    ])  # fmt: skip
    found = targets(res)
    ratio = found["collage S=2 / parm k=4, p99, every load (worst)"]
    assert ratio["value"] == pytest.approx(300.0 / 250.0) and ratio["where"] == "poisson at load 0.5"
    assert ratio["met"] is False and "parm k=4: 3.0% answered by the parity" in ratio["why"]
    assert "5.0% of groups with 2+ unanswered" in ratio["why"]
    accuracy = found["accuracy, collage S=2 minus parm k=4 (pooled)"]
    assert accuracy["value"] == pytest.approx((1.0 + -1.0) / 2) and accuracy["met"] is True
    summary = render_summary(with_targets(res))
    assert "## ParM beside the collage at the same k" in summary
    assert "| burst | 0.5 | parm k=2 | 450.0 | 0.89 | 0.9250 | 0.50 | 0.0% | - |" in summary


def test_runs_without_parm_have_no_parm_targets() -> None:
    assert not [name for name in targets(results()) if "parm" in name]
