# --- fixtures for the model workers: exported models and a real worker process on loopback ---

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from collage_inference.modelspec import ModelConfig, ModelMeta
from collage_inference.training.checkpoint import save_checkpoint
from collage_inference.training.export import export_onnx
from collage_inference.training.models import build_model

READY_TIMEOUT_S = 60.0  # importing torch and onnxruntime on a busy 2-core machine is slow

# Tiny architectures: random weights are enough for protocol and endpoint tests.
SMALL = {
    "scnn": ModelConfig("scnn", 10, stem_width=8, widths=(8, 16), blocks=(1, 1), strides=(2, 2)),
    "collage-2x2": ModelConfig(
        "collage", 10, image_size=16, grid=2, stem_width=8, widths=(8, 16), blocks=(1, 1), strides=(2, 2)
    ),
}
CLASSES = tuple(f"class{i}" for i in range(10))


def shipped_or_small(models_dir: Path, name: str, out_dir: Path) -> Path:
    """The shipped ``NAME.onnx`` when it is there; otherwise a random model exported beside its
    ``.pt`` checkpoint (so both backends can load it)."""
    shipped = models_dir / f"{name}.onnx"
    if shipped.exists() and shipped.with_suffix(".pt").exists():
        return shipped
    path = out_dir / f"{name}.onnx"
    model, meta = build_model(SMALL[name]).eval(), ModelMeta(name, SMALL[name], CLASSES)
    save_checkpoint(path.with_suffix(".pt"), model, meta)
    export_onnx(model, meta, path)
    return path


@pytest.fixture(scope="session")
def serving_models(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``scnn`` and ``collage-2x2`` ONNX paths, shipped or random."""
    out = tmp_path_factory.mktemp("models")
    return {name: shipped_or_small(models_dir, name, out) for name in SMALL}


@dataclass
class WorkerProcess:
    """A worker started as a real subprocess; ``url`` is its base URL once it printed the ready line."""

    proc: subprocess.Popen
    url: str

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


def start_worker(*args: str) -> WorkerProcess:
    """Start ``python -m collage_inference.serving.worker ARGS --port 0`` and wait for its ready line."""
    cmd = [sys.executable, "-m", "collage_inference.serving.worker", "--port", "0", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if line.startswith("ready on "):
                return WorkerProcess(proc, line.split()[-1].strip())
            if not line and proc.poll() is not None:
                break
    proc.kill()
    _, err = proc.communicate()
    raise RuntimeError(f"worker did not become ready (exit {proc.returncode}): {err[-2000:]}")


@pytest.fixture(scope="module")
def worker_factory() -> Iterator[Callable[..., WorkerProcess]]:
    """Start workers with given flags; every one still running is killed after the module."""
    started: list[WorkerProcess] = []

    def make(*args: str) -> WorkerProcess:
        worker = start_worker(*args)
        started.append(worker)
        return worker

    yield make
    for worker in started:
        if worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.wait()
