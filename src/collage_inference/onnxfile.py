"""Reading exported models without PyTorch: the ONNX Runtime session and embedded metadata."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import onnxruntime as ort

from collage_inference.errors import ModelError
from collage_inference.modelspec import ModelMeta

META_KEY = "collage_inference"


def onnx_session(path: Path, threads: int = 1) -> ort.InferenceSession:
    """An ONNX Runtime CPU session with a fixed thread count (1 keeps workers predictable)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ModelError(f"ONNX Runtime cannot load {path}: {exc}") from exc


def read_onnx_meta(path: Path) -> ModelMeta:
    """The metadata embedded by :func:`export_onnx`."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelError(f"{path} is not a readable ONNX file ({exc})") from exc
    props = {p.key: p.value for p in proto.metadata_props}
    if META_KEY not in props:
        raise ModelError(f"{path} carries no '{META_KEY}' metadata; export it with `collage export`")
    return ModelMeta.from_dict(json.loads(props[META_KEY]))
