"""`collage eval`: accuracy, cost and CPU latency of trained models on a test split.

s-CNN accuracy is plain top-1. Collage accuracy is per cell over full collages built from the
test split with a fixed seed, every test image used exactly once; ``accuracy_partial`` does the
same over collages with 1..k-1 images; ``empty_detection`` is the share of empty cells that the
model calls empty. Latency is batch-1, median of timed runs after a warm-up, for PyTorch eager
and ONNX Runtime with the same thread count.

Parity models (ParM, :mod:`collage_inference.parm`): top-1 is ParM's degraded-mode accuracy,
the label decoded by subtraction for each image of each test group of k taken in turn as the
missing one, against the true label; agreement is the same decode against the s-CNN's label
(ParM's "reconstruction" accuracy).

Agreement: the share of a collage model's cells (full collages) whose label is the one the s-CNN
gives the same image. The collage answers for the s-CNN when it straggles, so agreeing with it is
what keeps the answers the same whoever gave them.

Sure cells: the share of a collage model's cells (full collages) whose top probability reaches
``SURE`` (the front end's ``confident_at``), their accuracy, and the s-CNN's accuracy on the very
same images. The front end's ``confident`` policy answers such a cell at once instead of waiting
for the primary, so the gap between the last two is what that costs in accuracy.
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
from collage_inference.training.train import logits_of, to_tensor

EVAL_SEED = 2020
SURE = 0.9  # the confidence at which the front end answers from a collage cell at once


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
    sure_share: float | None = None  # collage: cells with confidence >= SURE
    sure_accuracy: float | None = None  # collage: their accuracy
    scnn_sure_accuracy: float | None = None  # the s-CNN's accuracy on the same images
    agreement: float | None = None  # collage: share of cells labelled as the s-CNN labels the image

    def to_dict(self) -> dict:
        return asdict(self)


def predict(model: nn.Module, inputs: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Arg-max labels for uint8 (N, H, W, C) inputs: (N,) for s-CNN, (N, k) for collages."""
    return predict_with_confidence(model, inputs, batch_size)[0]


def predict_with_confidence(
    model: nn.Module, inputs: np.ndarray, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """(arg-max labels, top softmax probability), each (N,) for s-CNN or (N, k) for collages."""
    labels, confidence = [], []
    with torch.no_grad():
        for i in range(0, len(inputs), batch_size):
            top = model(to_tensor(inputs[i : i + batch_size])).softmax(-1).max(-1)
            labels.append(top.indices.numpy())
            confidence.append(top.values.numpy())
    return np.concatenate(labels), np.concatenate(confidence)


@dataclass(frozen=True)
class _CollageScores:
    accuracy: float  # over real cells
    detection: float | None  # share of empty cells predicted empty
    sure: tuple[float, float, float | None] | None  # (share, accuracy, s-CNN accuracy) at >= SURE
    agreement: float | None  # share of real cells whose label is the s-CNN's for that image


def _collage_scores(
    model: nn.Module,
    meta: ModelMeta,
    tiles: np.ndarray,
    labels: np.ndarray,
    partial: bool,
    scnn_labels: np.ndarray | None = None,
) -> _CollageScores:
    synth = CollageSynthesizer(tiles, labels, meta.grid, meta.config.num_classes)
    batch = synth.build(synth.evaluation_sources(EVAL_SEED, partial))
    pred, confidence = predict_with_confidence(model, batch.collages)
    real = batch.sources != EMPTY_SOURCE
    right = pred == batch.labels
    empty = ~real
    detection = float((pred[empty] == meta.config.num_classes).mean()) if empty.any() else None
    sure_cells = real & (confidence >= SURE)
    sure = agreement = None
    if scnn_labels is not None:
        agreement = float((pred[real] == scnn_labels[batch.sources[real]]).mean())
    if sure_cells.any():
        scnn = None
        if scnn_labels is not None:
            scnn = float((scnn_labels[batch.sources[sure_cells]] == batch.labels[sure_cells]).mean())
        sure = (float(sure_cells.sum() / real.sum()), float(right[sure_cells].mean()), scnn)
    return _CollageScores(float(right[real].mean()), detection, sure, agreement)


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


def scnn_logits(checkpoint: Path, test: ImageDataset) -> np.ndarray:
    """An s-CNN's logits for every image of ``test``, (N, classes)."""
    model, meta = load_checkpoint(checkpoint)
    return logits_of(model, fit_images(test.images, meta.config.image_size, meta.config.in_channels))


def scnn_predictions(checkpoint: Path, test: ImageDataset) -> np.ndarray:
    """An s-CNN's label for every image of ``test``, (N,)."""
    return scnn_logits(checkpoint, test).argmax(-1)


def _degraded(model: nn.Module, meta: ModelMeta, test: ImageDataset, logits: np.ndarray | None):
    """A parity model's degraded-mode scores on the test split (every image in one group)."""
    from collage_inference.training.parity import ParityQueries, degraded_scores, fixed_groups

    if logits is None:
        raise ConfigError(f"{meta.name} is a parity model: evaluate it with its s-CNN (name scnn.pt too)")
    cfg = meta.config
    queries = ParityQueries(
        fit_images(test.images, cfg.image_size, cfg.in_channels), cfg.parity_k, cfg.encoder
    )
    groups = fixed_groups(len(test), cfg.parity_k, EVAL_SEED)
    return degraded_scores(model, queries, logits, test.labels, groups)


def evaluate_model(
    checkpoint: Path,
    test: ImageDataset,
    threads: int = 1,
    latency_runs: int = 200,
    scnn_labels: np.ndarray | None = None,
    scnn_outputs: np.ndarray | None = None,
) -> ModelReport:
    """Evaluate one checkpoint (and the ``.onnx`` beside it, if any) on a test split.
    ``scnn_labels``: an s-CNN's labels for the same split, to compare a collage model's cells
    with (see the module docstring); ``scnn_outputs``: its logits, which a parity model decodes
    with (its accuracy is ParM's degraded-mode accuracy, its agreement the reconstruction)."""
    model, meta = load_checkpoint(checkpoint)
    cfg = meta.config
    images = fit_images(test.images, cfg.image_size, cfg.in_channels)
    partial = detection = sure = agreement = None
    if meta.kind == "parity":
        degraded = _degraded(model, meta, test, scnn_outputs)
        accuracy, agreement = degraded.accuracy, degraded.reconstruction
    elif meta.kind == "scnn":
        accuracy = float((predict(model, images) == test.labels).mean())
    else:
        full = _collage_scores(model, meta, images, test.labels, False, scnn_labels)
        accuracy, sure, agreement = full.accuracy, full.sure, full.agreement
        scores = _collage_scores(model, meta, images, test.labels, partial=True)
        partial, detection = scores.accuracy, scores.detection
    cost = model_cost(model, cfg)
    torch_ms, onnx_ms = measure_latency(model, meta, checkpoint.with_suffix(".onnx"), threads, latency_runs)
    return ModelReport(
        meta.name,
        meta.kind,
        cfg.parity_k if meta.kind == "parity" else meta.grid,
        accuracy,
        partial,
        detection,
        cost.gflops,
        cost.params,
        torch_ms,
        onnx_ms,
        *(sure or (None, None, None)),
        agreement,
    )


def _pct(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else f"{100 * value:.2f}%"


def _sure(r: ModelReport) -> str:
    if r.sure_share is None:
        return ""
    return ", ".join(_pct(v) for v in (r.sure_share, r.sure_accuracy, r.scnn_sure_accuracy) if v is not None)


def _shape(r: ModelReport) -> str:
    return f"k={r.grid}" if r.kind == "parity" else f"{r.grid}x{r.grid}"


def render_table(reports: list[ModelReport]) -> str:
    """The results table as markdown (the MODEL_CARD and README show this exact table)."""
    scnn = next((r for r in reports if r.kind == "scnn"), None)
    head = (
        "| model | kind | grid or group | top-1 | agrees with s-CNN | partial collages | empty detected "
        f"| cells at confidence >= {SURE:g}: share, top-1, s-CNN on them "
        "| MFLOPs | x s-CNN FLOPs | params | PyTorch ms | ONNX Runtime ms |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = []
    for r in reports:
        ratio = f"{r.gflops / scnn.gflops:.2f}" if scnn else ""
        onnx = f"{r.latency_ms_onnx:.3f}" if r.latency_ms_onnx is not None else ""
        rows.append(
            f"| {r.name} | {r.kind} | {_shape(r)} | {_pct(r.accuracy)} | {_pct(r.agreement)} "
            f"| {_pct(r.accuracy_partial)} "
            f"| {_pct(r.empty_detection)} | {_sure(r)} | {1000 * r.gflops:.1f} | {ratio} | {r.params:,} "
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
