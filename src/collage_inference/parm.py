"""ParM's code (Kosaian, Rashmi and Venkataraman, "Parity Models", SOSP 2019), the closest peer
of collage inference, built from its paper and its public code (Thesys-lab/parity-models).

One parity query encodes a group of k images; a parity model, the deployed s-CNN's architecture
trained so that its output on the query approximates the *sum* of the s-CNN's output vectors on
the k images, answers it; when exactly one image's s-CNN answer is missing, subtraction
recovers it: ``F(X_i) ~ F_P(P) - sum of the other F(X_j)``. Pure NumPy (and PIL for resizing),
shared by training, evaluation and serving.

Encoders, as in the repository's ``coders``:

- ``concat`` (its default for images, k = 2 or 4): each image is downsampled and the k are
  placed side by side (k = 2: each H x W/2) or in the quadrants of one image (k = 4: each
  H/2 x W/2, row-major), giving a query the size of one image.
- ``sum`` (the original encoder): the pixel-wise sum of the k images. Departure: the query is
  sent as the pixel-wise *mean* (the sum divided by k, rounded to 8 bits), so that it travels as
  an ordinary image; the parity model learns the same function up to a constant factor on its
  input, and its normalisation is fitted to the encoded queries as for every model here.

Output vectors are the s-CNN's logits (softmax-free, as in the repository).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from collage_inference.errors import GeometryError

ENCODERS = ("concat", "sum")
CONCAT_KS = (2, 4)


def check_code(k: int, encoder: str) -> None:
    """Refuse a group size and encoder ParM does not define."""
    if encoder not in ENCODERS:
        raise GeometryError(f"unknown ParM encoder {encoder!r}; choose one of {', '.join(ENCODERS)}")
    if encoder == "concat" and k not in CONCAT_KS:
        raise GeometryError(f"the concatenation encoder takes k = 2 or 4, got k = {k}")
    if k < 2:
        raise GeometryError(f"a parity group holds at least 2 images, got k = {k}")


def _resize(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (N, H, W, C) -> (N, height, width, C), PIL's antialiased bilinear filter."""
    out = np.empty((len(images), height, width, images.shape[3]), np.uint8)
    for i, image in enumerate(images):
        pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
        out[i] = np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR)).reshape(out.shape[1:])
    return out


def concat_parts(images: np.ndarray, k: int) -> np.ndarray:
    """Each image (N, H, W, C) downsampled to its place in a concatenation query: (N, H, W/2, C)
    for k = 2, (N, H/2, W/2, C) for k = 4. Done once per image, before grouping."""
    check_code(k, "concat")
    _, h, w, _ = images.shape
    if h % 2 or w % 2:
        raise GeometryError(f"the concatenation encoder needs even image sides, got {h}x{w}")
    return _resize(images, h, w // 2) if k == 2 else _resize(images, h // 2, w // 2)


def assemble(parts: np.ndarray) -> np.ndarray:
    """Concatenation queries from groups of downsampled parts (B, k, h, w, C): side by side for
    k = 2, quadrants (row-major) for k = 4; returns (B, H, W, C)."""
    b, k, h, w, c = parts.shape
    if k == 2:
        return np.concatenate([parts[:, 0], parts[:, 1]], axis=2)
    top = np.concatenate([parts[:, 0], parts[:, 1]], axis=2)
    bottom = np.concatenate([parts[:, 2], parts[:, 3]], axis=2)
    return np.concatenate([top, bottom], axis=1)


def encode(groups: np.ndarray, encoder: str) -> np.ndarray:
    """Parity queries for groups of images at the s-CNN's input size, (B, k, H, W, C) uint8 ->
    (B, H, W, C) uint8."""
    if groups.ndim != 5 or groups.dtype != np.uint8:
        raise GeometryError(f"groups must be uint8 (B, k, H, W, C), got {groups.dtype} {groups.shape}")
    b, k, h, w, c = groups.shape
    check_code(k, encoder)
    if encoder == "sum":
        return np.rint(groups.mean(axis=1, dtype=np.float32)).astype(np.uint8)
    parts = concat_parts(groups.reshape(b * k, h, w, c), k)
    return assemble(parts.reshape(b, k, *parts.shape[1:]))


def decode(parity_output: np.ndarray, available: np.ndarray) -> np.ndarray:
    """The subtraction decoder: the missing member's output vector from the parity model's
    output (..., C) and the k - 1 available outputs (..., k - 1, C)."""
    return parity_output - available.sum(axis=-2)
