"""What the load generator sends and reads: one request body per test image, one label per answer.

Three targets. ``v2``: the Open Inference Protocol as a collage-inference worker or front end
speaks it (a UINT8 ``image`` tensor in, an integer ``label`` out, with the answer's ``source``
and ``*_ms`` timings when the server names them). ``tensor``: the exported model's own tensors,
as Triton, KServe or MLServer serve the ONNX file (FP32 ``input`` (N, C, H, W) in [0, 1], resized
and scaled as training did; the label is the argmax of ``logits``), so such a server can be
measured directly beside the front end in front of it. ``predict``: a PNG posted to
``/predict``, answered by a JSON object with an integer ``label``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from collage_inference.errors import ConfigError, ModelError, ProtocolError
from collage_inference.serving.runtime import prepare_images
from collage_inference.serving.v2 import (
    HEADER_LENGTH,
    InferRequest,
    InferTensor,
    RequestedOutput,
    parse_infer_response,
    render_infer_request,
)

if TYPE_CHECKING:
    from collage_inference.bench.loadgen import LoadConfig


@dataclass(frozen=True)
class TensorInput:
    """The exported model's own input: FP32 (N, channels, side, side) under ``input``; the
    scores come back as ``output``."""

    side: int
    channels: int
    input: str = "input"
    output: str = "logits"

    @classmethod
    def of_file(cls, path: Path) -> TensorInput:
        """The input of an exported ONNX file, read from the metadata it carries."""
        from collage_inference.onnxfile import read_onnx_meta  # onnx is needed only here

        try:
            facts = read_onnx_meta(Path(path)).facts()
        except ModelError as exc:
            raise ConfigError(f"--model-file: {exc}") from None
        return cls(int(facts["input_size"]), int(facts["channels"]))


def as_hwc(images: np.ndarray) -> np.ndarray:
    """Test images as uint8 (N, H, W, C), refusing anything else with what was given."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) == 0:
        raise ConfigError(
            f"images must be a non-empty uint8 (N, H, W[, C]) array, got {images.dtype} {images.shape}"
        )
    return images[..., None] if images.ndim == 3 else images


def render_payload(image: np.ndarray, config: LoadConfig) -> tuple[bytes, dict[str, str]]:
    """The request body and headers for one (H, W, C) uint8 image."""
    if config.target == "predict":
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(buffer, format="PNG")
        return buffer.getvalue(), {"Content-Type": "image/png"}
    if config.target == "tensor":
        tensor = config.tensor
        assert tensor is not None  # LoadConfig refuses the tensor target without it
        x = prepare_images(image[None], tensor.side, tensor.channels)
        request = InferRequest(
            None, (InferTensor.of(tensor.input, x),), (RequestedOutput(tensor.output, binary=config.binary),)
        )
    else:
        request = InferRequest(None, (InferTensor.of("image", image),), binary_outputs=config.binary)
    return render_infer_request(request, binary_inputs=config.binary)


@dataclass(frozen=True)
class Answer:
    """The parts of a response the benchmark uses."""

    label: int
    source: str | None
    timings: Mapping[str, float]


def parse_answer(body: bytes, headers: Mapping[str, str], target: str, scores: str = "logits") -> Answer:
    """One label (plus source and ``*_ms`` timings when present) from a 200 response; for the
    ``tensor`` target, the argmax of the output named ``scores``.

    Raises :class:`ProtocolError` when the body is not a one-label answer."""
    if target == "predict":
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise ProtocolError(f"/predict answered non-JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ProtocolError("/predict must answer a JSON object")
        label, source, parameters = doc.get("label"), doc.get("source"), doc.get("parameters", {})
        parameters = {**doc, **parameters} if isinstance(parameters, dict) else doc
        labels = np.asarray(label if isinstance(label, list) else [label], dtype=object)
    else:
        response = parse_infer_response(body, headers.get(HEADER_LENGTH))
        parameters = dict(response.parameters)
        source = parameters.get("source")
        if target == "tensor":
            values = response.output(scores).data
            if values.dtype.kind != "f" or values.size == 0 or values.size != values.shape[-1]:
                raise ProtocolError(f"expected one row of {scores!r}, got {values.dtype} {values.shape}")
            labels = np.asarray([values.argmax()])
        else:
            labels = response.output("label").data.ravel()
        if any(t.name == "source" for t in response.outputs):
            raw = response.output("source").data.ravel()
            source = raw[0].decode(errors="replace") if raw.size == 1 else None
    if labels.size != 1 or isinstance(labels[0], bool) or not isinstance(labels[0], int | np.integer):
        raise ProtocolError(f"expected one integer label, got {labels.tolist()!r}")
    return Answer(int(labels[0]), source if isinstance(source, str) else None, _timings(parameters))


def _timings(parameters: Mapping[str, Any]) -> dict[str, float]:
    """Numeric ``*_ms`` values (a number or a one-element list, as a batch-of-one answer has)
    and the entries of a ``timings_ms`` object; everything else is ignored."""
    found: dict[str, float] = {}
    nested = parameters.get("timings_ms")
    items = list(parameters.items())
    if isinstance(nested, dict):
        items += [(f"{k}_ms", v) for k, v in nested.items()]
    for key, value in items:
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if key.endswith("_ms") and isinstance(value, int | float) and not isinstance(value, bool):
            found[key] = float(value)
    return found
