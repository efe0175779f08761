"""What a client sends the front end, read into images; what it gets back, as JSON.

One image per request: a V2 infer call on the classifier model with a UINT8 tensor (H, W) or
(H, W, C), or BYTES holding a PNG/JPEG (several images as a batch are split into one request
each), or ``POST /predict`` with the image file as the body or as a multipart field. Every
image is checked here (size, decodability, no decompression bombs) before it is admitted.
"""

from __future__ import annotations

import email.parser
import email.policy
import io
import warnings
from typing import Any

import numpy as np
from PIL import Image

from collage_inference.errors import PayloadTooLargeError, ProtocolError
from collage_inference.serving.types import Answer
from collage_inference.serving.v2 import InferTensor

MAX_IMAGE_SIDE = 4096  # decoded images beyond this are refused: no decompression bombs


def parse_image_bytes(data: bytes) -> np.ndarray:
    """A PNG/JPEG file to uint8 (H, W, C), refusing huge or broken images with a clear 4xx."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if max(im.size) > MAX_IMAGE_SIDE:
                    width, height = im.size
                    raise PayloadTooLargeError(
                        f"image of {width}x{height} pixels exceeds {MAX_IMAGE_SIDE} per side; resize it"
                    )
                im.load()
                array = np.asarray(im.convert("L" if im.mode in ("L", "1", "I;16", "I") else "RGB"))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLargeError(f"image refused as a decompression bomb: {exc}") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ProtocolError(f"the image does not decode as PNG or JPEG ({exc})") from exc
    return array[:, :, None] if array.ndim == 2 else array


def images_from_tensor(tensor: InferTensor) -> list[np.ndarray]:
    """One uint8 (H, W, C) image per request from a V2 input tensor."""
    data = tensor.data
    if tensor.datatype == "BYTES":
        return [parse_image_bytes(bytes(item)) for item in data.reshape(-1)]
    if tensor.datatype != "UINT8":
        raise ProtocolError(
            f"input {tensor.name!r} is {tensor.datatype}; send UINT8 pixels (H, W) or (H, W, C), "
            "or BYTES holding a PNG/JPEG file"
        )
    if data.ndim == 2:
        return [data[:, :, None]]
    if data.ndim == 3 and data.shape[2] in (1, 3):
        return [data]
    if data.ndim == 4 and data.shape[3] in (1, 3):
        return list(data)
    raise ProtocolError(
        f"input {tensor.name!r} has shape {list(data.shape)}; send (H, W), (H, W, C) or (N, H, W, C) "
        "with C = 1 or 3"
    )


def check_side(image: np.ndarray) -> np.ndarray:
    """The image, contiguous, if its sides lie within bounds."""
    if image.shape[0] < 1 or image.shape[1] < 1 or max(image.shape[:2]) > MAX_IMAGE_SIDE:
        raise ProtocolError(f"image sides must lie in 1..{MAX_IMAGE_SIDE}, got {image.shape[:2]}")
    return np.ascontiguousarray(image)


def answer_json(answer: Answer) -> dict[str, Any]:
    """``POST /predict``'s answer."""
    return {
        "label": answer.label,
        "class_name": answer.class_name,
        "confidence": round(answer.confidence, 6),
        "source": str(answer.source),
        "latency_ms": round(answer.latency * 1e3, 3),
        "worker": answer.worker_id,
        "timings_ms": {k: round(v * 1e3, 3) for k, v in answer.timings.items()},
    }


def first_multipart_part(body: bytes, content_type: str) -> bytes:
    """The first part of a multipart body (``curl -F file=@image.png``); the body was already
    read within the server's size and time limits."""
    head = f"Content-Type: {content_type}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    parts = list(message.iter_parts()) if message.is_multipart() else []
    if not parts:
        raise ProtocolError("the multipart body holds no file; send -F file=@image.png")
    return parts[0].get_payload(decode=True) or b""
