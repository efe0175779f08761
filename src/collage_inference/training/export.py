"""Export to ONNX with the model's metadata embedded, and a parity check against PyTorch.

The exported graph takes float32 pixels in [0, 1], (N, C, H, W), with a dynamic batch axis;
normalisation is part of the graph. Its ``collage_inference`` metadata entry holds the
:class:`ModelMeta` as JSON, so a worker can serve the ``.onnx`` file alone.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from collage_inference.errors import ExportError
from collage_inference.modelspec import ModelMeta
from collage_inference.onnxfile import META_KEY, onnx_session

PARITY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ExportReport:
    path: Path
    max_abs_diff: float


def export_onnx(model: nn.Module, meta: ModelMeta, path: Path, opset: int = 17) -> ExportReport:
    """Export ``model`` to ``path`` and check ONNX Runtime against PyTorch on random inputs."""
    cfg = meta.config
    model = model.eval()
    example = torch.rand(2, cfg.in_channels, cfg.input_size, cfg.input_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter warns about its own future
            torch.onnx.export(
                model,
                (example,),
                str(path),
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=opset,
                dynamo=False,
            )
        proto = onnx.load(str(path))
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_KEY, json.dumps(meta.to_dict())
        proto.producer_name = "collage-inference"
        onnx.checker.check_model(proto)
        onnx.save(proto, str(path))
    except Exception as exc:
        raise ExportError(f"ONNX export of {meta.name} to {path} failed: {exc}") from exc
    return ExportReport(path, parity_check(model, path))


def parity_check(model: nn.Module, path: Path, seed: int = 0) -> float:
    """Max absolute logit difference, PyTorch vs ONNX Runtime, over batches of 1 and 8."""
    session = onnx_session(path)
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch in (1, 8):
        x = torch.rand(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {"input": x.numpy()})[0]
        worst = max(worst, float(np.abs(expected - got).max()))
    if worst > PARITY_TOLERANCE:
        raise ExportError(f"{path}: ONNX logits differ from PyTorch by {worst:.2e} > {PARITY_TOLERANCE}")
    return worst
