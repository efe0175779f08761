"""A short real training run on a Fashion-MNIST subset must clearly beat chance (10%)."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from collage_inference.errors import ConfigError
from collage_inference.onnxfile import read_onnx_meta
from collage_inference.training.checkpoint import load_checkpoint
from collage_inference.training.evaluate import evaluate_model, scnn_logits, scnn_predictions

pytestmark = pytest.mark.slow


def _train(tmp_path, *flags: str):
    out = tmp_path / "model.pt"
    cmd = [
        sys.executable,
        "-m",
        "collage_inference.cli",
        "train",
        "--quiet",
        "--train-limit",
        "3000",
        "--out",
        str(out),
        *flags,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "trained in" in done.stdout and out.exists() and out.with_suffix(".onnx").exists()
    assert not out.with_suffix(".resume.pt").exists()
    return out


def test_short_scnn_run_beats_chance(tmp_path, fashion_test):
    out = _train(tmp_path, "--kind", "scnn", "--width", "8", "--epochs", "3", "--batch-size", "64")
    _, meta = load_checkpoint(out)
    assert meta.dataset["fingerprint"] and meta.metrics["epochs"] == 3
    assert read_onnx_meta(out.with_suffix(".onnx")) == meta
    report = evaluate_model(out, fashion_test.subset(np.arange(1000)), latency_runs=5)
    assert report.accuracy > 0.6


def test_short_collage_run_beats_chance(tmp_path, fashion_test):
    out = _train(
        tmp_path,
        "--kind",
        "collage",
        "--grid",
        "2",
        "--tile-size",
        "16",
        "--width",
        "16",
        "--epochs",
        "4",
        "--batch-size",
        "32",
    )
    report = evaluate_model(out, fashion_test.subset(np.arange(1000)), latency_runs=5)
    assert report.kind == "collage" and report.grid == 2
    assert report.accuracy > 0.4 and report.empty_detection > 0.5


def test_a_collage_model_is_sized_to_its_scnn_and_learns_its_soft_labels(tmp_path, models_dir, fashion_test):
    scnn = models_dir / "scnn.pt"
    out = _train(tmp_path, "--kind", "collage", "--grid", "2", "--tile-size", "16", "--scnn", str(scnn),
                 "--distill", "0.5", "--epochs", "2", "--batch-size", "32")  # fmt: skip
    _, meta = load_checkpoint(out)
    _, teacher = load_checkpoint(scnn)
    ratio = meta.metrics["gflops"] / teacher.metrics["gflops"]
    assert 0.85 <= ratio <= 1.0 and f"{ratio:.2f}x the s-CNN's FLOPs" in meta.sizing
    cmd = [sys.executable, "-m", "collage_inference.cli", "info", str(out.with_suffix(".onnx"))]
    info = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(info.stdout)["sizing"] == meta.sizing
    test = fashion_test.subset(np.arange(1000))
    report = evaluate_model(out, test, latency_runs=5, scnn_labels=scnn_predictions(scnn, test))
    assert report.accuracy > 0.4 and report.agreement is not None and report.agreement > 0.4


def test_bad_flags_give_a_clear_error(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "collage_inference.cli",
        "train",
        "--kind",
        "collage",
        "--tile-size",
        "10",
        "--out",
        str(tmp_path / "m.pt"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "multiple of 4" in done.stderr


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    from collage_inference.modelspec import ModelConfig
    from collage_inference.training import train as train_module

    model = ModelConfig("scnn", 10, stem_width=8, widths=(8, 16), blocks=(1, 1), strides=(2, 2))
    cfg = train_module.TrainConfig(model, tmp_path / "m.pt", epochs=2, train_limit=1200, progress=False)
    real_validate = train_module._Task.validate
    calls = []

    def validate_then_crash(self, net):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the machine went away during epoch 2
        return real_validate(self, net)

    monkeypatch.setattr(train_module._Task, "validate", validate_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(cfg)
    assert (tmp_path / "m.resume.pt").exists() and not (tmp_path / "m.pt").exists()
    monkeypatch.setattr(train_module._Task, "validate", real_validate)
    result = train_module.train(dataclasses.replace(cfg, resume=True))
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert not (tmp_path / "m.resume.pt").exists() and result.path.exists()


def test_a_parity_model_learns_the_sum_of_the_scnn_outputs(tmp_path, models_dir, fashion_test):
    """A short ParM run: its degraded-mode decode beats chance, and `collage eval` scores it."""
    scnn = models_dir / "scnn.pt"
    out = _train(tmp_path, "--kind", "parity", "--k", "2", "--encoder", "concat", "--scnn", str(scnn),
                 "--epochs", "2")  # fmt: skip
    _, meta = load_checkpoint(out)
    assert (meta.kind, meta.config.parity_k, meta.config.encoder) == ("parity", 2, "concat")
    assert meta.metrics["val_reconstruction"] > 0.3 and read_onnx_meta(out.with_suffix(".onnx")) == meta
    test = fashion_test.subset(np.arange(1000))
    outputs = scnn_logits(scnn, test)
    report = evaluate_model(out, test, latency_runs=5, scnn_outputs=outputs)
    assert report.kind == "parity" and report.grid == 2
    assert 0.3 < report.accuracy < 0.95 and report.agreement > 0.3
    with pytest.raises(ConfigError, match="s-CNN"):
        evaluate_model(out, test, latency_runs=5)
