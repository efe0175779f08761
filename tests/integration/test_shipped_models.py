"""The shipped models reach their targets, and `collage eval` reproduces the MODEL_CARD figures."""

import json
import subprocess
import sys

import pytest

from collage_inference.onnxfile import read_onnx_meta
from collage_inference.training.checkpoint import load_checkpoint
from collage_inference.training.evaluate import TABLE_END, TABLE_START
from collage_inference.training.export import parity_check

pytestmark = pytest.mark.slow

PARITY = ("parm-k2-concat", "parm-k2-sum", "parm-k4-concat", "parm-k4-sum")
NAMES = ("scnn", "collage-2x2", "collage-3x3", "collage-4x4", *PARITY)
TARGETS = {"scnn": 0.935, "collage-2x2": 0.92, "collage-3x3": 0.905, "collage-4x4": 0.885}
RECORDED = ("accuracy", "agreement", "accuracy_partial", "empty_detection", "gflops", "params", "grid")
AGREEMENT = {"collage-2x2": 0.95, "collage-3x3": 0.94, "collage-4x4": 0.93}  # with the s-CNN


@pytest.fixture(scope="module")
def live(models_dir):
    cmd = [sys.executable, "-m", "collage_inference.cli", "eval", "--json", "--latency-runs", "30",
           "--models-dir", str(models_dir)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return {m["name"]: m for m in json.loads(done.stdout)["models"]}


@pytest.fixture(scope="module")
def recorded(models_dir):
    return {m["name"]: m for m in json.loads((models_dir / "eval.json").read_text())["models"]}


def test_every_shipped_model_is_there_and_small(models_dir):
    for name in NAMES:
        for suffix in (".pt", ".onnx"):
            path = models_dir / f"{name}{suffix}"
            assert path.exists(), f"{path} is missing; run `make models`"
            assert path.stat().st_size < 4 * 2**20


def test_eval_reproduces_the_recorded_figures(live, recorded):
    assert set(live) == set(recorded) == set(NAMES)
    for name in NAMES:
        for key in (*RECORDED, "kind"):
            want, got = recorded[name][key], live[name][key]
            if isinstance(want, float):
                assert got == pytest.approx(want, abs=5e-4), f"{name} {key}"
            else:
                assert got == want, f"{name} {key}"


def test_targets_are_met(live):
    scnn = live["scnn"]
    for name in TARGETS:
        m = live[name]
        assert m["accuracy"] >= TARGETS[name], f"{name} top-1 {m['accuracy']:.4f} < {TARGETS[name]}"
        if m["kind"] == "collage":
            assert 0.85 <= m["gflops"] / scnn["gflops"] <= 1.0, f"{name} is not sized to one s-CNN pass"
            assert m["agreement"] >= AGREEMENT[name], f"{name} agrees with the s-CNN on {m['agreement']:.4f}"
            assert m["accuracy_partial"] >= m["accuracy"] - 0.005, f"{name} partial collages lag"
            assert m["empty_detection"] >= 0.99, f"{name} misses empty cells"


def test_collage_cells_beat_parm_degraded_mode_at_the_same_k(live):
    """The comparison with ParM (k = 4: collage 2x2 and parity models of 4 images)."""
    for parity in ("parm-k4-concat", "parm-k4-sum"):
        assert live[parity]["kind"] == "parity" and live[parity]["grid"] == 4
        assert live["collage-2x2"]["accuracy"] > live[parity]["accuracy"], parity


def test_card_and_readme_show_the_recorded_table(models_dir):
    from collage_inference.training.evaluate import ModelReport, render_table

    recorded = json.loads((models_dir / "eval.json").read_text())["models"]
    table = render_table([ModelReport(**m) for m in recorded])
    for doc in (models_dir / "MODEL_CARD.md", models_dir.parents[1] / "README.md"):
        text = doc.read_text()
        assert f"{TABLE_START}\n{table}\n{TABLE_END}" in text, f"{doc.name} is out of step with eval.json"


@pytest.mark.parametrize("name", NAMES)
def test_onnx_matches_checkpoint(models_dir, name):
    model, meta = load_checkpoint(models_dir / f"{name}.pt")
    assert read_onnx_meta(models_dir / f"{name}.onnx") == meta
    assert parity_check(model, models_dir / f"{name}.onnx") <= 1e-4
