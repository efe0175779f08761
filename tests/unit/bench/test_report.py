"""The bench report from a synthetic results dict: every file written, the ratios right."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from collage_inference.bench.report import (
    Target,
    compute_targets,
    console_summary,
    miss_reasons,
    others_line,
    render_summary,
    short_spec,
    with_targets,
    write_report,
)


def run(p99: float, std: float = 5.0, accuracy: float = 0.9, extra_cost: float = 0.0, **more: Any) -> dict:
    return {
        "p50_ms": 15.0,
        "p90_ms": 20.0,
        "p99_ms": p99,
        "p999_ms": p99 * 1.2,
        "mean_ms": 16.0,
        "std_ms": std,
        "max_ms": p99 * 1.5,
        "throughput_rps": 50.0,
        "accuracy": accuracy,
        "extra_cost": extra_cost,
        "sources": {"primary": 0.97, "collage": 0.03},
        "errors": {},
        "cdf": {"p": [0.0, 0.5, 0.9, 0.99, 0.999, 1.0], "ms": [5.0, 15.0, 20.0, p99, p99 * 1.2, p99 * 1.5]},
        **more,
    }


def scenario(name: str = "trace", grid: int = 3) -> dict:
    k = grid * grid
    return {
        "name": name,
        "spec": "trace:/somewhere/cloud-latency-trace.npy:0.1",
        "kind": "per-request",
        "description": "synthetic",
        "grid": grid,
        "k": k,
        "reference": run(18.0, std=3.0, accuracy=0.9100),
        "modes": {
            "none": run(90.0, std=15.0),
            "equal": run(85.0, extra_cost=1 / k),
            "replicate": run(
                51.0,
                extra_cost=1 / k,
                replicate_timeout_ms=30.0,
                sweep=[{"timeout_ms": 20.0, "p99_ms": 60.0}, {"timeout_ms": 30.0, "p99_ms": 51.0}],
            ),
            "hedge": run(40.0, extra_cost=1 / k),
            "replicate-all": run(28.0, extra_cost=1.0),
            "collage": run(30.0, std=5.0, accuracy=0.9085, extra_cost=1 / k),
        },
    }


def results(scenarios: list[dict] | None = None) -> dict:
    points = [
        {"grid": g, "p50_ms": 15.0, "p90_ms": 20.0, "p99_ms": 30.0 + g, "p999_ms": 40.0 + g, "std_ms": 5.0,
         "accuracy": 0.91 - 0.002 * g, "scnn_accuracy": 0.91, "extra_cost": 1 / g**2,
         "sources": {"collage": 0.03}}
        for g in (2, 3, 4)
    ]  # fmt: skip
    return {
        "schema": 1,
        "date": "2026-11-29T06:00:00+00:00",
        "command": "collage bench --quick",
        "quick": True,
        "duration_s": 120.0,
        "machine": {"python": "3.11", "platform": "Linux", "cpus": 2, "cpu_model": "test", "busy": False},
        "code_version": "collage-inference 0.1.0",
        "load": {"rate_rps": 50.0, "arrival": "poisson", "requests": 400, "warmup": 50, "seed": 0},
        "slowdown_seed": 0,
        "straggle_collage": True,
        "scenarios": scenarios or [scenario()],
        "grid_sweep": {"scenario": "trace", "points": points, "notes": []},
    }


def by_name(targets: list[Target]) -> dict[str, Target]:
    return {t.name: t for t in targets}


def test_ratios_are_computed_from_the_right_modes() -> None:
    t = by_name(compute_targets(scenario()))
    assert t["p99 replicate (best) / p99 collage"].value == pytest.approx(51 / 30)
    assert t["p99 hedge / p99 collage"].value == pytest.approx(40 / 30)
    assert t["p99 none / p99 collage"].value == pytest.approx(3.0)
    assert t["std none / std collage"].value == pytest.approx(3.0)
    assert t["p99 collage / p99 replicate-all"].value == pytest.approx(30 / 28)
    assert t["accuracy drop of collage vs s-CNN alone"].value == pytest.approx(0.15)
    assert t["extra cost of collage"].value == pytest.approx(1 / 9)
    assert t["extra cost of collage"].goal == pytest.approx(1 / 9)


def test_met_and_missed_targets_say_by_how_much() -> None:
    t = by_name(compute_targets(scenario()))
    assert t["p99 replicate (best) / p99 collage"].met is True  # 1.70 >= 1.7
    hedge = t["p99 hedge / p99 collage"]
    assert hedge.met is False
    assert "short by 0.17x" in hedge.gap and "11% below" in hedge.gap
    assert t["p99 none / p99 collage"].met is True  # exactly on the goal counts
    assert t["p99 collage / p99 replicate-all"].met is True
    assert t["accuracy drop of collage vs s-CNN alone"].met is True
    assert t["extra cost of collage"].met is True
    over = Target("x", 1.3, 1.15, "<=")
    assert over.met is False and over.gap.startswith("over by 0.15x")
    assert Target("drop", 0.5, 0.3, "<=", " points").gap.startswith("over by 0.20 points")


def test_missing_modes_are_not_run_rather_than_failed() -> None:
    sc = scenario()
    sc["modes"] = {m: sc["modes"][m] for m in ("none", "collage")}
    t = by_name(compute_targets(sc))
    assert t["p99 hedge / p99 collage"].value is None
    assert t["p99 hedge / p99 collage"].met is None and t["p99 hedge / p99 collage"].gap == ""
    assert t["p99 none / p99 collage"].met is True


def test_a_zero_or_nan_denominator_gives_no_ratio() -> None:
    sc = scenario()
    sc["modes"]["collage"]["p99_ms"] = 0.0
    sc["modes"]["collage"]["std_ms"] = math.nan
    t = by_name(compute_targets(sc))
    assert t["p99 none / p99 collage"].value is None
    assert t["std none / std collage"].value is None


def test_write_report_produces_every_file(tmp_path: Path) -> None:
    res = results([scenario("trace"), scenario("bimodal")])
    written = write_report(res, tmp_path)
    names = {p.name for p in written}
    assert names == {
        "results.json", "summary.md", "cdf-trace.png", "tail-trace.png", "cdf-bimodal.png",
        "tail-bimodal.png", "grid-sweep.png",
    }  # fmt: skip
    for path in written:
        assert path.is_file() and path.stat().st_size > 0
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stored = json.loads((tmp_path / "results.json").read_text())
    targets = {t["name"]: t for t in stored["scenarios"][0]["targets"]}
    assert targets["p99 hedge / p99 collage"]["met"] is False
    assert targets["p99 none / p99 collage"]["value"] == pytest.approx(3.0)
    # A stored run re-renders to the same summary.
    assert render_summary(stored) == (tmp_path / "summary.md").read_text()


def test_summary_names_setting_machine_and_targets(tmp_path: Path) -> None:
    res = results()
    res["machine"]["busy"] = True
    write_report(res, tmp_path)
    text = (tmp_path / "summary.md").read_text()
    assert "50 req/s" in text and "400 measured" in text and "BUSY" in text
    assert "## trace: `trace:cloud-latency-trace.npy:0.1` (per-request), S = 3" in text
    assert "| p99 hedge / p99 collage | 1.333x | >= 1.5x | NO | short by 0.17x" in text
    assert "| replicate (30 ms) |" in text
    assert "Replicate timeout sweep (best: 30 ms): 20 ms -> p99 60.0, 30 ms -> p99 51.0." in text
    assert "## Grid size" in text and "| 4 | 16 |" in text
    assert "![latency CDF](cdf-trace.png)" in text
    console = console_summary(res)
    assert "p99 none / p99 collage" in console and "reference (no stragglers)" in console


def test_no_grid_sweep_no_sweep_plot(tmp_path: Path) -> None:
    res = results()
    res["grid_sweep"] = None
    names = {p.name for p in write_report(res, tmp_path)}
    assert "grid-sweep.png" not in names and "summary.md" in names


def test_short_spec() -> None:
    assert short_spec("trace:/a/b/t.npy:0.1") == "trace:t.npy:0.1"
    assert short_spec("bimodal:0.1") == "bimodal:0.1"


def test_a_missed_target_says_why_from_the_same_run() -> None:
    sc = scenario()
    sc["ideal"] = {"p50_one_ms": 13.8, "p90_one_ms": 18.9, "p99_one_ms": 70.2, "p99_min2_ms": 18.9,
                   "std_one_ms": 8.6, "std_min2_ms": 2.6}  # fmt: skip
    sc["modes"]["collage"]["mean_group_size"] = 1.4
    sc["modes"]["none"]["p99_ms"] = 60.0  # none / collage = 2: missed
    why = miss_reasons(sc, compute_targets(sc))
    assert set(why) == {"p99 hedge / p99 collage", "p99 none / p99 collage"}  # std: 15 / 5 = 3, met
    assert "1.4 requests per collage" in why["p99 none / p99 collage"]
    assert "bound any backup to" in why["p99 none / p99 collage"]
    assert "p99 is 1.43x replicate-all's" in why["p99 hedge / p99 collage"]
    text = render_summary(with_targets(results([sc])))
    assert "Why the misses:" in text and "The straggler samples alone" in text


def test_replicate_all_worse_than_collage_is_called_contention() -> None:
    sc = scenario()
    sc["modes"]["replicate-all"]["p99_ms"] = 45.0
    why = miss_reasons(sc, compute_targets(sc))
    assert "replicate-all did worse than collage" in why["p99 hedge / p99 collage"]


def test_runs_that_shared_the_machine_are_named() -> None:
    sc = scenario()
    sc["modes"]["none"]["others_cpu_share"] = 0.02
    sc["modes"]["hedge"]["others_cpu_share"] = 0.4
    line = others_line(sc)
    assert "none 2%" in line and "hedge 40%" in line
    assert "shared the machine (over 25%): hedge;" in line
    assert others_line(scenario()) == ""


def test_a_partial_run_says_so() -> None:
    assert "PARTIAL" in render_summary(with_targets({**results(), "partial": True}))
    assert "PARTIAL" not in render_summary(with_targets(results()))
