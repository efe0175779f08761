"""Checkpoints that rebuild their model from the file alone.

A checkpoint is a ``torch.save`` dict: the architecture config, weights and a
:class:`ModelMeta` (class names, normalisation, dataset fingerprint, metrics, code version).
Training state (optimizer, scheduler, epoch) rides along in resumable checkpoints only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from collage_inference.errors import ModelError
from collage_inference.modelspec import ModelMeta
from collage_inference.training.models import build_model

FORMAT_VERSION = 1


def save_checkpoint(
    path: Path, model: nn.Module, meta: ModelMeta, training: dict[str, Any] | None = None
) -> None:
    """Write model weights and metadata (and optional training state) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format_version": FORMAT_VERSION, "meta": meta.to_dict(), "state_dict": model.state_dict()}
    if training is not None:
        payload["training"] = training
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The raw checkpoint dict, with clear errors for missing or foreign files."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise ModelError(f"checkpoint {path} does not exist; train one with `collage train`") from exc
    except Exception as exc:  # torch raises many types for corrupt files
        raise ModelError(f"{path} is not a readable checkpoint ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise ModelError(f"{path} is not a collage-inference checkpoint (format {FORMAT_VERSION})")
    return payload


def load_checkpoint(path: Path) -> tuple[nn.Module, ModelMeta]:
    """Rebuild a model in eval mode from its checkpoint file alone."""
    payload = read_checkpoint(path)
    meta = ModelMeta.from_dict(payload["meta"])
    model = build_model(meta.config)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise ModelError(f"{path}: weights do not match the saved architecture ({exc})") from exc
    return model.eval(), meta
