"""`collage train --kind parity`: a ParM parity model for the deployed s-CNN, trained as ParM's
repository trains one (see :mod:`collage_inference.parm` for the code itself).

The s-CNN is frozen. Each step draws groups of k training images, encodes each group into one
parity query, and regresses the parity model's output on the *sum* of the s-CNN's logits on the
group (MSE), with Adam (lr 1e-3, weight decay 1e-5) and ParM's minibatch of 64 groups for k = 2
and 32 otherwise. After every epoch the parity model is scored on validation groups in degraded
mode: each member in turn is taken as missing and recovered by subtraction; the reconstruction
top-1 (agreement of the decoded label with the s-CNN's) picks the checkpoint kept, as ParM's
trainer does.

Departures from the repository, all of scale or plumbing: tens of epochs instead of 500-1000
(the validation curve is printed, so whether it had flattened is visible); the s-CNN's logits
are computed once per image on un-augmented images, as ParM's data loader serves them; the sum
encoder's query is the mean image (see :mod:`collage_inference.parm`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from collage_inference.data import load_dataset
from collage_inference.errors import ConfigError, GeometryError
from collage_inference.grid import fit_images
from collage_inference.modelspec import ModelMeta
from collage_inference.parm import assemble, check_code, concat_parts, decode, encode
from collage_inference.training.checkpoint import load_checkpoint, save_checkpoint
from collage_inference.training.models import build_model, model_cost
from collage_inference.training.train import TrainResult, channel_stats, logits_of, split_training, to_tensor


@dataclass(frozen=True)
class ParityConfig:
    """One parity model: for the s-CNN checkpoint ``scnn``, groups of ``k``, ``encoder``."""

    scnn: Path
    k: int
    encoder: str
    out: Path
    dataset: str = "fashion-mnist"
    data_dir: Path | None = None
    epochs: int = 30
    batch_size: int | None = None  # groups per step; None: ParM's 64 for k = 2, 32 otherwise
    lr: float = 1e-3
    weight_decay: float = 1e-5
    val_size: int | None = None
    train_limit: int | None = None
    seed: int = 0
    progress: bool = True  # accepted for the CLI's sake; one line per epoch is printed anyway
    name: str = ""

    def __post_init__(self) -> None:
        try:
            check_code(self.k, self.encoder)
        except GeometryError as exc:
            raise ConfigError(f"--k / --encoder: {exc}") from None


class ParityQueries:
    """Builds parity queries for groups of image indices; a concatenation query's parts are
    downsampled once per image."""

    def __init__(self, images: np.ndarray, k: int, encoder: str) -> None:
        self.images, self.encoder = images, encoder
        self.parts = concat_parts(images, k) if encoder == "concat" else None

    def build(self, groups: np.ndarray) -> np.ndarray:
        """(B, k) indices -> (B, H, W, C) uint8 queries."""
        if self.parts is not None:
            return assemble(self.parts[groups])
        return encode(self.images[groups], self.encoder)


def fixed_groups(n: int, k: int, seed: int) -> np.ndarray:
    """Every image in one group of k (a seeded shuffle; a last partial group is left out)."""
    order = np.random.default_rng(seed).permutation(n)
    return order[: n // k * k].reshape(-1, k)


@dataclass(frozen=True)
class DegradedScores:
    """Degraded mode: every member of every group taken in turn as the missing one."""

    accuracy: float  # decoded label == true label
    reconstruction: float  # decoded label == the s-CNN's label on that image
    scnn_accuracy: float  # the s-CNN's own accuracy on the same images, for reference


def degraded_scores(
    model: nn.Module, queries: ParityQueries, scnn_logits: np.ndarray, labels: np.ndarray, groups: np.ndarray
) -> DegradedScores:
    """Decode each member of each group from the parity output and the other k - 1 outputs."""
    parity = logits_of(model, queries.build(groups))  # (G, C)
    members = scnn_logits[groups]  # (G, k, C)
    k = groups.shape[1]
    others = np.stack([np.delete(members, i, axis=1) for i in range(k)], axis=1)  # (G, k, k-1, C)
    decoded = decode(parity[:, None, :], others).argmax(-1)  # (G, k)
    truth, scnn = labels[groups], members.argmax(-1)
    return DegradedScores(
        float((decoded == truth).mean()), float((decoded == scnn).mean()), float((scnn == truth).mean())
    )


def train_parity(cfg: ParityConfig) -> TrainResult:
    """Train one parity model and write its checkpoint to ``cfg.out``."""
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(cfg.seed)
    scnn, scnn_meta = load_checkpoint(cfg.scnn)
    if scnn_meta.kind != "scnn":
        raise ConfigError(f"--scnn {cfg.scnn} is a {scnn_meta.kind} model; a parity model backs an s-CNN")
    full = load_dataset(cfg.dataset, "train", cfg.data_dir)
    if full.class_names != scnn_meta.class_names:
        raise ConfigError(f"--scnn {cfg.scnn} was trained on other classes than {full.name}")
    train_set, val = split_training(full, cfg.train_limit, cfg.val_size, cfg.seed)
    size, channels = scnn_meta.config.image_size, scnn_meta.config.in_channels
    x_train, x_val = fit_images(train_set.images, size, channels), fit_images(val.images, size, channels)
    f_train, f_val = logits_of(scnn, x_train), logits_of(scnn, x_val)
    q_train, q_val = ParityQueries(x_train, cfg.k, cfg.encoder), ParityQueries(x_val, cfg.k, cfg.encoder)
    sample = fixed_groups(len(x_train), cfg.k, cfg.seed)[:10000]
    mean, std = channel_stats(q_train.build(sample))
    model_cfg = dataclasses.replace(
        scnn_meta.config, kind="parity", parity_k=cfg.k, encoder=cfg.encoder, mean=mean, std=std
    )
    model = build_model(model_cfg).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    batch = cfg.batch_size or (64 if cfg.k == 2 else 32)
    val_groups = fixed_groups(len(x_val), cfg.k, cfg.seed + 1)
    name = cfg.name or cfg.out.stem
    best: tuple[float, dict[str, Any], DegradedScores] | None = None
    history: list[dict[str, float]] = []
    elapsed = 0.0
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        groups = fixed_groups(len(x_train), cfg.k, cfg.seed * 1000 + epoch + 2)
        running = 0.0
        for i in range(0, len(groups), batch):
            g = groups[i : i + batch]
            target = torch.from_numpy(f_train[g].sum(axis=1))
            loss = nn.functional.mse_loss(model(to_tensor(q_train.build(g))), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item() * len(g)
        rate = len(groups) / (time.perf_counter() - t0)
        scores = degraded_scores(model, q_val, f_val, val.labels, val_groups)
        elapsed += time.perf_counter() - t0
        history.append({"epoch": epoch + 1, "loss": running / len(groups), "val_reconstruction":
                        scores.reconstruction, "val_degraded_accuracy": scores.accuracy, "seconds": elapsed,
                        "inputs_per_second": rate})  # fmt: skip
        print(
            f"{name} epoch {epoch + 1}/{cfg.epochs}: mse {running / len(groups):.4f} val reconstruction "
            f"{scores.reconstruction:.4f} degraded accuracy {scores.accuracy:.4f}, {rate:.0f} queries/s "
            f"({elapsed / 60:.1f} min)",
            file=sys.stderr,
            flush=True,
        )
        if best is None or scores.reconstruction > best[0]:
            best = (scores.reconstruction, {k: v.clone() for k, v in model.state_dict().items()}, scores)
    assert best is not None  # epochs >= 1
    model.load_state_dict(best[1])
    cost = model_cost(model, model_cfg)
    meta = ModelMeta(
        name,
        model_cfg,
        full.class_names,
        {"kind": cfg.dataset, "name": full.name, "fingerprint": full.fingerprint, "scnn": scnn_meta.name},
        metrics={
            "val_reconstruction": best[2].reconstruction,
            "val_degraded_accuracy": best[2].accuracy,
            "val_accuracy": best[2].accuracy,  # the key every checkpoint's metrics have
            "train_seconds": round(elapsed, 1),
            "epochs": cfg.epochs,
            "gflops": cost.gflops,
            "params": cost.params,
            "inputs_per_second": round(float(np.median([h["inputs_per_second"] for h in history])), 1),
        },
        sizing=f"the s-CNN's architecture ({scnn_meta.name}), as ParM's parity models are",
    )
    save_checkpoint(cfg.out, model.eval(), meta)
    return TrainResult(cfg.out, meta, elapsed, history)
