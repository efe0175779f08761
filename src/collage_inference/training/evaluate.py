"""`collage eval`: accuracy, cost and CPU latency of trained models on a test split.

s-CNN accuracy is plain top-1. Collage accuracy is per cell over full collages built from the
test split with a fixed seed, every test image used exactly once; ``accuracy_partial`` does the
same over collages with 1..k-1 images; ``empty_detection`` is the share of empty cells that the
model calls empty. Latency is batch-1, median of timed runs after a warm-up, for PyTorch eager
and ONNX Runtime with the same thread count.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from collage_inference import __version__
from collage_inference.data import ImageDataset
from collage_inference.errors import ConfigError
from collage_inference.grid import fit_images
from collage_inference.modelspec import ModelMeta
from collage_inference.onnxfile import onnx_session
from collage_inference.training.checkpoint import load_checkpoint
from collage_inference.training.models import model_cost
from collage_inference.training.synthesis import EMPTY_SOURCE, CollageSynthesizer
from collage_inference.training.train import to_tensor

EVAL_SEED = 2020


@dataclass(frozen=True)
class ModelReport:
    """One row of the results table (`collage eval --json` prints these)."""

    name: str
    kind: str
    grid: int
    accuracy: float
    accuracy_partial: float | None
    empty_detection: float | None
    gflops: float
    params: int
    latency_ms_torch: float
    latency_ms_onnx: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def predict(model: nn.Module, inputs: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Arg-max labels for uint8 (N, H, W, C) inputs: (N,) for s-CNN, (N, k) for collages."""
    out = []
    with torch.no_grad():
        for i in range(0, len(inputs), batch_size):
            out.append(model(to_tensor(inputs[i : i + batch_size])).argmax(-1).numpy())
    return np.concatenate(out)


def _collage_scores(model: nn.Module, meta: ModelMeta, tiles: np.ndarray, labels: np.ndarray, partial: bool):
    """(accuracy over real cells, share of empty cells predicted empty or None)."""
    synth = CollageSynthesizer(tiles, labels, meta.grid, meta.config.num_classes)
    batch = synth.build(synth.evaluation_sources(EVAL_SEED, partial))
    pred = predict(model, batch.collages)
    real = batch.sources != EMPTY_SOURCE
    accuracy = float((pred == batch.labels)[real].mean())
    empty = ~real
    detection = float((pred[empty] == meta.config.num_classes).mean()) if empty.any() else None
    return accuracy, detection


def _median_ms(fn, runs: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_latency(model: nn.Module, meta: ModelMeta, onnx_path: Path | None, threads: int, runs: int):
    """Batch-1 median latency in ms: (PyTorch eager, ONNX Runtime or None)."""
    cfg = meta.config
    x = torch.rand(1, cfg.in_channels, cfg.input_size, cfg.input_size)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            torch_ms = _median_ms(lambda: model(x), runs)
    finally:
        torch.set_num_threads(previous)
    onnx_ms = None
    if onnx_path is not None and onnx_path.exists():
        session, feed = onnx_session(onnx_path, threads), {"input": x.numpy()}
        onnx_ms = _median_ms(lambda: session.run(None, feed), runs)
    return torch_ms, onnx_ms


def evaluate_model(
    checkpoint: Path, test: ImageDataset, threads: int = 1, latency_runs: int = 200
) -> ModelReport:
    """Evaluate one checkpoint (and the ``.onnx`` beside it, if any) on a test split."""
    model, meta = load_checkpoint(checkpoint)
    cfg = meta.config
    images = fit_images(test.images, cfg.image_size, cfg.in_channels)
    partial = detection = None
    if meta.kind == "scnn":
        accuracy = float((predict(model, images) == test.labels).mean())
    else:
        accuracy, _ = _collage_scores(model, meta, images, test.labels, partial=False)
        partial, detection = _collage_scores(model, meta, images, test.labels, partial=True)
    cost = model_cost(model, cfg)
    torch_ms, onnx_ms = measure_latency(model, meta, checkpoint.with_suffix(".onnx"), threads, latency_runs)
    return ModelReport(
        meta.name,
        meta.kind,
        meta.grid,
        accuracy,
        partial,
        detection,
        cost.gflops,
        cost.params,
        torch_ms,
        onnx_ms,
    )


def _pct(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else f"{100 * value:.2f}%"


def render_table(reports: list[ModelReport]) -> str:
    """The results table as markdown (the MODEL_CARD and README show this exact table)."""
    scnn = next((r for r in reports if r.kind == "scnn"), None)
    head = (
        "| model | kind | grid | top-1 | partial collages | empty detected | MFLOPs | x s-CNN FLOPs "
        "| params | PyTorch ms | ONNX Runtime ms |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = []
    for r in reports:
        ratio = f"{r.gflops / scnn.gflops:.2f}" if scnn else ""
        onnx = f"{r.latency_ms_onnx:.3f}" if r.latency_ms_onnx is not None else ""
        rows.append(
            f"| {r.name} | {r.kind} | {r.grid}x{r.grid} | {_pct(r.accuracy)} | {_pct(r.accuracy_partial)} "
            f"| {_pct(r.empty_detection)} | {1000 * r.gflops:.1f} | {ratio} | {r.params:,} "
            f"| {r.latency_ms_torch:.3f} | {onnx} |"
        )
    return "\n".join([head, *rows])


TABLE_START, TABLE_END = "<!-- eval-table:start -->", "<!-- eval-table:end -->"


def machine_summary() -> str:
    """Where a figure was measured: CPU model, core count, OS, library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    import onnxruntime

    return (
        f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, collage-inference {__version__}"
    )


def replace_table(text: str, table: str, where: str) -> str:
    """Put ``table`` between the eval-table markers of a markdown document."""
    if TABLE_START not in text or TABLE_END not in text:
        raise ConfigError(f"{where} lacks the {TABLE_START} ... {TABLE_END} markers around its table")
    head, rest = text.split(TABLE_START, 1)
    return f"{head}{TABLE_START}\n{table}\n{TABLE_END}{rest.split(TABLE_END, 1)[1]}"


def write_model_card(models_dir: Path, result: dict, table: str, also: tuple[Path, ...] = ()) -> None:
    """Record eval figures in ``eval.json`` and the table of ``MODEL_CARD.md`` (and of the
    documents in ``also``, such as the README), so every copy stays in step."""
    (models_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    for doc in (models_dir / "MODEL_CARD.md", *also):
        doc.write_text(replace_table(doc.read_text(), table, str(doc)))
