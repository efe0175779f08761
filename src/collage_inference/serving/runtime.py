"""Load one exported model and run it: the compute half of a worker, with no HTTP in sight.

ONNX Runtime is the default backend (one file, fixed thread count, no Python in the hot loop);
PyTorch runs the ``.pt`` checkpoint for comparison or where ONNX Runtime is missing. Either
file may be given: the runner looks for its sibling with the same stem.

Every model takes float32 pixels in [0, 1], (N, C, H, W), and returns logits: (N, classes) for
an s-CNN, (N, S*S, classes + 1) for a collage-CNN (last class ``empty``). The runner turns them
into a :class:`BatchPrediction`: label indices and softmax probabilities, per image or per cell.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from collage_inference.errors import ConfigError, ModelError, ProtocolError
from collage_inference.grid import fit_images
from collage_inference.modelspec import ModelMeta

BACKENDS = ("onnx", "torch")
_SUFFIX = {"onnx": ".onnx", "torch": ".pt"}


@dataclass(frozen=True, eq=False)
class BatchPrediction:
    """labels: (N,) or (N, S*S) int64; probabilities: (N, classes) or (N, S*S, classes + 1) float32."""

    labels: np.ndarray
    probabilities: np.ndarray


class ModelRunner:
    """A loaded model and its metadata; call it from one thread at a time."""

    def __init__(self, path: Path, meta: ModelMeta, backend: str) -> None:
        self.path = path
        self.meta = meta
        self.backend = backend
        cfg = meta.config
        self.input_shape = (cfg.in_channels, cfg.input_size, cfg.input_size)  # (C, H, W)

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Logits shape of one input, without the batch axis."""
        cfg = self.meta.config
        return (cfg.grid * cfg.grid, cfg.outputs) if self.meta.kind == "collage" else (cfg.outputs,)

    def prepare_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W) or (N, H, W, C) of any size -> float32 (N, C, H, W) in [0, 1]."""
        channels, size, _ = self.input_shape
        return prepare_images(images, size, channels)

    def run_images(self, images: np.ndarray) -> BatchPrediction:
        """Classify a uint8 image batch (N, H, W[, C]); images are resized to the model input."""
        return self.run_pixels(self.prepare_images(images))

    def run_pixels(self, x: np.ndarray) -> BatchPrediction:
        """Classify float32 pixels in [0, 1], (N, C, H, W) at the model's input size."""
        if x.dtype != np.float32 or x.ndim != 4 or x.shape[1:] != self.input_shape:
            raise ProtocolError(
                f"model {self.meta.name} takes float32 (N, {', '.join(map(str, self.input_shape))}) "
                f"pixels, got {x.dtype} {x.shape}; send uint8 images to have them resized"
            )
        if x.size and (x.min() < 0.0 or x.max() > 1.0):
            raise ProtocolError("pixels must lie in [0, 1]; divide 0-255 values by 255")
        logits = self._logits(x) if len(x) else np.zeros((0, *self.output_shape), np.float32)
        probabilities = softmax(logits)
        return BatchPrediction(probabilities.argmax(axis=-1).astype(np.int64), probabilities)

    def _logits(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class OnnxRunner(ModelRunner):
    """ONNX Runtime on CPU with ``threads`` intra-op threads."""

    def __init__(self, path: Path, threads: int) -> None:
        from collage_inference.onnxfile import onnx_session, read_onnx_meta

        super().__init__(path, read_onnx_meta(path), "onnx")
        self._session = onnx_session(path, threads)

    def _logits(self, x: np.ndarray) -> np.ndarray:
        try:
            return self._session.run(["logits"], {"input": x})[0]
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelError(f"ONNX Runtime failed on {self.path}: {exc}") from exc


class TorchRunner(ModelRunner):
    """The PyTorch checkpoint in eval mode, under ``torch.inference_mode``."""

    def __init__(self, path: Path, threads: int) -> None:
        import torch

        from collage_inference.training.checkpoint import load_checkpoint

        torch.set_num_threads(threads)
        model, meta = load_checkpoint(path)
        super().__init__(path, meta, "torch")
        self._torch = torch
        self._model = model

    def _logits(self, x: np.ndarray) -> np.ndarray:
        if not x.flags.writeable:  # parsed binary tensors view the read-only request body
            x = x.copy()
        with self._torch.inference_mode():
            return self._model(self._torch.from_numpy(x)).numpy()


def prepare_images(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    """uint8 (N, H, W) or (N, H, W, C) of any size -> float32 (N, C, size, size) in [0, 1], what
    every exported model takes. Resizing uses :func:`collage_inference.grid.fit_images`, the
    resize training used, so a served image looks exactly like a trained one."""
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ProtocolError(
            f"images must be uint8 (N, H, W) or (N, H, W, C), got {images.dtype} {images.shape}"
        )
    try:
        fitted = fit_images(images, size, channels)  # (N, size, size, C)
    except Exception as exc:  # GeometryError or PIL's own errors for odd sizes
        raise ProtocolError(f"cannot fit images {images.shape} to {size}x{size}x{channels}: {exc}") from exc
    x = np.empty((len(fitted), channels, size, size), np.float32)
    np.multiply(fitted.transpose(0, 3, 1, 2), np.float32(1 / 255), out=x)
    return x


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis, in float32."""
    z = logits.astype(np.float32, copy=True)
    z -= z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def resolve_model_path(path: Path | str, backend: str) -> Path:
    """The file ``backend`` loads for ``path``: itself, or its sibling with the backend's suffix."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    path = Path(path)
    wanted = path.with_suffix(_SUFFIX[backend])
    if wanted.exists():
        return wanted
    if path.exists() and path.suffix not in _SUFFIX.values():
        raise ConfigError(f"{path} is neither an ONNX (.onnx) nor a checkpoint (.pt) file")
    hint = "export it with `collage export`" if backend == "onnx" else "train it with `collage train`"
    raise ModelError(f"backend {backend!r} needs {wanted}, which does not exist; {hint}")


def load_runner(path: Path | str, backend: str = "onnx", threads: int = 1) -> ModelRunner:
    """Load the model at ``path`` (``.onnx`` or ``.pt``) for ``backend`` and warm it up once."""
    if threads < 1:
        raise ConfigError(f"threads must be at least 1, got {threads}")
    resolved = resolve_model_path(path, backend)
    runner = OnnxRunner(resolved, threads) if backend == "onnx" else TorchRunner(resolved, threads)
    runner.run_pixels(
        np.zeros((1, *runner.input_shape), np.float32)
    )  # first call allocates; keep it off the clock
    return runner
