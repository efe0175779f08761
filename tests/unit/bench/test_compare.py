"""The pure parts of `collage bench`: flags, load points, run plans, the harness's sweeps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from collage_inference.bench.compare import BenchConfig, build_parser, config_from_args, reference_point
from collage_inference.bench.harness import Harness, Images, RunSpec, cdf_points, median_run
from collage_inference.bench.machine import cpu_account, others_share
from collage_inference.bench.scenarios import LoadPoint, Scenario, builtin_scenarios, load_points
from collage_inference.config import load_config
from collage_inference.errors import ConfigError

MISSING = "/nonexistent/trace.npy"


def config(argv: list[str]) -> BenchConfig:
    return config_from_args(build_parser().parse_args(argv), argv)


def test_loads_are_utilisations_turned_into_rates() -> None:
    points = load_points(("burst", "poisson"), (0.25, 0.5), k=9, service_s=0.15)
    assert [(p.pattern, p.load) for p in points] == [
        ("burst", 0.25), ("burst", 0.5), ("poisson", 0.25), ("poisson", 0.5)
    ]  # fmt: skip
    assert points[1].rate == pytest.approx(0.5 * 9 / 0.15)
    with pytest.raises(ConfigError):
        load_points(("burst",), (1.2,), 9, 0.15)
    with pytest.raises(ConfigError):
        load_points(("wave",), (0.5,), 9, 0.15)


def test_the_trace_runs_at_its_own_time_scale_by_default(tmp_path: Path) -> None:
    trace = tmp_path / "t.npy"
    np.save(trace, np.full(100, 0.2))
    cfg = config(["--trace", str(trace)])
    assert cfg.scenario.name == "trace" and cfg.scenario.spec.endswith(":1")
    assert cfg.scenario.service_s() == pytest.approx(0.2)
    assert [p.rate for p in cfg.points()][:3] == pytest.approx([0.25 * 45, 0.5 * 45, 0.75 * 45])
    assert config(["--trace", MISSING]).scenario.name == "bimodal"


def test_quick_is_one_burst_and_one_poisson_point() -> None:
    cfg = config(["--quick", "--trace", MISSING])
    assert [(p.pattern, p.load) for p in cfg.points()] == [("burst", 0.5), ("poisson", 0.5)]
    # none, 2 replicate timeouts (idle re-issues), hedge, replicate-all, collage, per point; + reference
    assert cfg.runs_per_point() == 6 and cfg.runs() == 2 * 6 + 1
    assert cfg.warmup % 9 == 0 and cfg.requests % 9 == 0  # whole bursts


def test_full_plan_counts_every_point_and_sweep() -> None:
    cfg = config(["--trace", MISSING])
    assert len(cfg.points()) == 6
    # none, equal, 3 timeouts x 2 re-issue targets, 2 hedges, replicate-all, collage,
    # collage (patient), collage-2, parm k=4 and k=2, and collage S=2 beside them
    assert cfg.runs_per_point() == 1 + 1 + 6 + 2 + 1 + 1 + 1 + 1 + 2 + 1
    assert cfg.extra_grids == (2,)
    assert cfg.runs() == 6 * 17 + 1
    assert config(["--trace", MISSING, "--grids", "2,4"]).runs_per_point() == 18  # S=2 is counted once
    assert config(["--trace", MISSING, "--policies", "none"]).runs_per_point() == 16
    assert config(["--trace", MISSING, "--policies", "patient,first"]).runs_per_point() == 18


@pytest.mark.parametrize(
    "argv",
    [
        ["--scenario", "nope"],
        ["--scenario", "trace", "--trace", MISSING],
        ["--modes", "none,turbo"],
        ["--modes", "collage"],
        ["--sweep", "1,x"],
        ["--loads", "0,0.5"],
        ["--patterns", "wave"],
        ["--time-scale", "-1"],
        ["--policies", "hasty"],
    ],
)
def test_bad_flags_are_config_errors(argv: list[str]) -> None:
    with pytest.raises(ConfigError):
        config([*argv, "--trace", MISSING] if "--trace" not in argv else argv).points()


def test_the_reference_runs_at_the_middle_poisson_load() -> None:
    points = load_points(("burst", "poisson"), (0.25, 0.5, 0.75), 9, 0.15)
    assert reference_point(points) == LoadPoint("poisson", 0.5, pytest.approx(30.0))


def harness(**kwargs) -> Harness:
    cfg = BenchConfig(scenario=builtin_scenarios(Path(MISSING))["bimodal"], **kwargs)
    images = Images(np.zeros((1, 28, 28), np.uint8), np.zeros(1, np.int64), "test")
    return Harness(cfg, cfg.scenario, images, log=lambda _: None)


def test_overrides_build_a_valid_serve_config() -> None:
    h = harness()
    point = LoadPoint("burst", 0.5, 30.0)
    serve = load_config(
        overrides=h.serve_overrides(
            RunSpec("replicate", 3, point, replicate_timeout=0.03, reissue_to="least-loaded")
        )
    )
    assert serve.mode == "replicate" and serve.replicate_timeout == 0.03 and serve.port == 0
    assert serve.reissue_to == "least-loaded" and serve.slowdown.collage and not serve.restart
    clean = load_config(overrides=h.serve_overrides(RunSpec("none", 3, point, stragglers=False)))
    assert not clean.slowdown.active and clean.reissue_to == "idle"
    other_s = load_config(overrides=h.serve_overrides(RunSpec("collage", 4, point, policy="patient")))
    assert other_s.scnn_count == 9 and other_s.grid == 4 and other_s.policy == "patient"  # the same k workers


def test_cdf_points_are_monotone_and_reach_the_max() -> None:
    lat = np.random.default_rng(0).exponential(10.0, 1000)
    cdf = cdf_points(lat)
    assert cdf["p"][0] == 0.0 and cdf["p"][-1] == 1.0
    assert np.all(np.diff(cdf["ms"]) >= 0) and cdf["ms"][-1] == pytest.approx(lat.max(), abs=1e-3)
    assert sum(p >= 0.99 for p in cdf["p"]) > 20  # dense in the tail
    assert cdf_points(np.array([])) == {"p": [], "ms": []}


def test_median_run_reports_medians_and_spread() -> None:
    runs = [{"p99_ms": v, "std_ms": v / 10, "accuracy": 0.9, "errors": {}} for v in (30.0, 10.0, 20.0)]
    for r in runs:
        r.update({k: 1.0 for k in ("p50_ms", "p90_ms", "p999_ms", "mean_ms", "max_ms", "throughput_rps")})
    out = median_run(runs)
    assert out["p99_ms"] == 20.0 and out["spread"]["p99_ms"] == [10.0, 30.0] and out["repeats"] == 3


def fake(h: Harness, best_ms: float, idle_bonus: float = 0.0) -> list[tuple[float, str]]:
    """Replicate runs report p99 = |timeout - best_ms| + 30 (idle re-issues ``idle_bonus`` less)."""
    seen: list[tuple[float, str]] = []

    def measure(spec: RunSpec) -> dict:
        assert spec.replicate_timeout is not None
        seen.append((spec.replicate_timeout * 1e3, spec.reissue_to))
        p99 = (
            abs(spec.replicate_timeout * 1e3 - best_ms)
            + 30.0
            - (idle_bonus if spec.reissue_to == "idle" else 0)
        )
        return {"p50_ms": 20.0, "p99_ms": p99, "std_ms": 1.0, "reissued_per_request": 0.1,
                "reissue_to": spec.reissue_to}  # fmt: skip

    h.measure = measure  # type: ignore[method-assign]
    return seen


def test_replicate_sweep_crosses_timeouts_with_reissue_targets_and_takes_the_lowest_p99() -> None:
    h = harness(sweep=(1.0, 2.0, 3.0), bracket=1)
    seen = fake(h, best_ms=40.0, idle_bonus=5.0)
    out = h.replicate_sweep(LoadPoint("burst", 0.5, 30.0), fast_ms=20.0)
    assert sorted(seen) == sorted((t, to) for t in (20.0, 40.0, 60.0) for to in ("idle", "least-loaded"))
    assert out["replicate_timeout_ms"] == pytest.approx(40.0) and out["reissue_to"] == "idle"
    assert len(out["sweep"]) == 6 and out["sweep"][0]["reissued_per_request"] == 0.1


def test_replicate_sweep_extends_past_an_end_that_holds_the_best() -> None:
    h = harness(sweep=(1.0, 2.0), bracket=2, reissue_targets=("idle",))
    seen = fake(h, best_ms=5.0)
    out = h.replicate_sweep(LoadPoint("burst", 0.5, 30.0), fast_ms=20.0)
    assert [t for t, _ in seen] == [20.0, 40.0, 12.0, 7.0]  # 20 ms * 0.6, then * 0.6 again (rounded)
    assert out["replicate_timeout_ms"] == pytest.approx(7.0)
    h = harness(sweep=(1.0, 2.0, 3.0), bracket=2, reissue_targets=("idle",))
    seen = fake(h, best_ms=40.0)
    h.replicate_sweep(LoadPoint("burst", 0.5, 30.0), fast_ms=20.0)
    assert [t for t, _ in seen] == [20.0, 40.0, 60.0]  # interior best: nothing added


def test_others_share_subtracts_our_own_cpu_time() -> None:
    # 10 CPU-seconds elapsed, 6 busy, 2 of them ours: others took 40%
    assert others_share((100.0, 1000.0, 5.0), (106.0, 1010.0, 7.0)) == pytest.approx(0.4)
    assert others_share((100.0, 1000.0, 5.0), (101.0, 1010.0, 9.0)) == 0.0  # clamped
    assert others_share(None, (1.0, 2.0, 3.0)) is None
    assert cpu_account() is None or len(cpu_account()) == 3


def test_scenario_ideal_figures_bound_any_backup() -> None:
    ideal = Scenario("b", "bimodal:1").ideal(draws=50_000)
    assert ideal["p99_min2_ms"] < ideal["p99_one_ms"] / 3  # the faster of two draws cuts the tail
    assert ideal["p50_one_ms"] == pytest.approx(138, rel=0.05)
