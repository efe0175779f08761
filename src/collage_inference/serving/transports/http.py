"""A model server over HTTP, speaking the Open Inference Protocol (KServe V2, binary tensors).

Two contracts, one code path. ``image``: a collage-inference worker, which takes the images as
one UINT8 ``image`` tensor (N, H, W, C), resizes them itself and answers ``probabilities``.
``tensor``: the exported model's own tensors, as Triton's ONNX Runtime backend, KServe or
MLServer serve the ONNX file: the front end resizes and scales the images as training did
(FP32 N, C, H, W in [0, 1] under the file's input name) and takes the softmax of its
``logits``. The contract is read from the server's model metadata (an UINT8 ``image`` input is
the worker's) unless declared.

The model's facts (kind, grid, labels, image_size, channels) come from three sources, the first
that has them winning: keys declared in the worker's table, the exported file named by
``model_file``, the server's metadata parameters (what a collage-inference worker publishes).

Every request the front end admits costs at least one call, so the call's CPU is latency on a
small machine: a call's HTTP head and JSON header depend on the batch's shape alone, so they
are rendered once per shape and each call is one write of that prefix and the pixels.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from collage_inference.config import FACT_KEYS
from collage_inference.errors import ModelError, ProtocolError, WorkerDownError, WorkerError
from collage_inference.serving.kept import Kept
from collage_inference.serving.runtime import prepare_images, softmax
from collage_inference.serving.transports.base import PARITY_KEYS, Inference, ModelInfo
from collage_inference.serving.v2 import (
    HEADER_LENGTH,
    InferRequest,
    InferTensor,
    RequestedOutput,
    V2Parser,
    render_infer_request,
)
from collage_inference.serving.web.client import HttpClient, HttpReply

_WORKER_TIMINGS = ("queue_ms", "compute_ms", "injected_ms")


@dataclass(frozen=True)
class _Tensors:
    """What a contract calls its tensors: the input's name, the scores' name, and (tensor
    contract) the side and channels the front end resizes images to."""

    input: str
    output: str
    side: int = 0
    channels: int = 0


_WORKER_TENSORS = _Tensors("image", "probabilities")
_LENGTH = HEADER_LENGTH.lower()


class HttpTransport:
    """One V2 model server at ``url`` serving ``model``. Lives on the front end's event loop."""

    # An HTTP call cannot be taken back from the server's queue; closing its keep-alive
    # connection would cost more than reading the reply.
    cancellable = False

    def __init__(
        self,
        url: str,
        model: str,
        token: str | None = None,
        *,
        model_file: Path | None = None,
        facts: Mapping[str, Any] | None = None,
        contract: str | None = None,
    ) -> None:
        self.url = self.name = url.rstrip("/")
        self.model, self.token = model, token
        self.model_file, self.declared, self.contract = model_file, dict(facts or {}), contract
        self._client = HttpClient(self.url)
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._prefixes: Kept[tuple[int, ...], bytes] = Kept(16)  # batch shape -> head + JSON header
        self._parser = V2Parser()
        self._tensors = _WORKER_TENSORS  # the names and input shape the contract uses; describe() sets them

    def infer(self, images: np.ndarray, timeout: float) -> Awaitable[Inference]:
        """Send uint8 images (N, H, W, C), written now when a keep-alive connection is idle."""
        if self.contract == "tensor":
            x = prepare_images(images, self._tensors.side, self._tensors.channels)
        else:
            x = images.astype(np.uint8, copy=False)
        try:
            reply = self._client.send(self._prefix(x) + x.tobytes(), timeout)
        except OSError as exc:  # the write itself failed: the connection is broken
            raise WorkerDownError(f"worker {self.url} failed: {exc!r}") from exc
        return self._result(reply)

    def _prefix(self, x: np.ndarray) -> bytes:
        prefix = self._prefixes.get(x.shape)
        if prefix is None:
            tensor = InferTensor.of(self._tensors.input, np.zeros(x.shape, x.dtype))
            request = InferRequest(None, (tensor,), (RequestedOutput(self._tensors.output, binary=True),))
            body, headers = render_infer_request(request, binary_inputs=True)
            header = body[: int(headers[HEADER_LENGTH])]
            length = len(header) + math.prod(x.shape) * x.dtype.itemsize
            head = self._client.head(
                "POST", f"/v2/models/{self.model}/infer", {**headers, **self._auth}, length
            )
            prefix = self._prefixes.keep(x.shape, head + header)
        return prefix

    async def _result(self, pending: Awaitable[HttpReply]) -> Inference:
        try:
            reply = await pending
        except (TimeoutError, OSError, ProtocolError) as exc:
            raise WorkerDownError(f"worker {self.url} failed: {exc!r}") from exc
        if reply.status != 200:
            # A 4xx (full queue, refused input) is the worker alive and saying why; a 5xx is a
            # broken worker.
            error = WorkerDownError if reply.status >= 500 else WorkerError
            raise error(f"worker {self.url} answered HTTP {reply.status}: {reply.body[:300]!r}")
        try:
            response = self._parser.parse_response(reply.body, reply.headers.get(_LENGTH))
            scores = np.asarray(response.output(self._tensors.output).data, np.float32)
        except ProtocolError as exc:
            raise WorkerDownError(f"worker {self.url} answered garbage: {exc}") from exc
        probabilities = softmax(scores) if self.contract == "tensor" else scores
        params = response.parameters
        timings = {k[:-3]: float(params[k]) / 1e3 for k in _WORKER_TIMINGS if k in params}
        return Inference(probabilities, timings)

    async def ready(self, timeout: float = 1.0) -> bool:
        """Whether the server answers its model's readiness check now."""
        try:
            reply = await self._client.request(
                "GET", f"/v2/models/{self.model}/ready", headers=self._auth, timeout=timeout
            )
        except (TimeoutError, OSError, ProtocolError):
            return False
        return reply.status == 200

    async def describe(self, timeout: float = 5.0) -> ModelInfo:
        """The model's facts (declared, from its file, or from the server) and its contract."""
        metadata = await self._metadata(timeout)
        parameters = metadata.get("parameters")
        facts = {
            k: v
            for k, v in (parameters if isinstance(parameters, dict) else {}).items()
            if k in FACT_KEYS or k in PARITY_KEYS
        }
        if self.model_file is not None:
            facts |= _file_facts(self.model_file)
        facts |= self.declared
        missing = [k for k in FACT_KEYS if k not in facts]
        if missing:
            raise WorkerError(
                f"model {self.model!r} at {self.url}: the front end needs {', '.join(missing)} and the "
                'server does not publish them; name the exported file (model_file = "PATH.onnx" in its '
                "[[scnn]]/[[collage]] table, or URL#MODEL@PATH.onnx), declare them in that table "
                f"({', '.join(FACT_KEYS)}), or serve the model with a collage-inference worker"
            )
        info = ModelInfo.from_facts(self.model, facts)
        self._choose_contract(metadata, info)
        return info

    async def _metadata(self, timeout: float) -> dict[str, Any]:
        where = f"model {self.model!r} at {self.url}"
        try:
            reply = await self._client.request(
                "GET", f"/v2/models/{self.model}", headers=self._auth, timeout=timeout
            )
            if reply.status == 401:
                raise WorkerError(
                    f"{where} refused the front end's token (401); start both with the same "
                    "$COLLAGE_TOKEN or --token-file"
                )
            if reply.status != 200:
                raise WorkerError(f"{where}: metadata answered HTTP {reply.status}: {reply.body[:200]!r}")
            doc = reply.json()
        except (TimeoutError, OSError, ProtocolError) as exc:
            raise WorkerError(f"cannot read the metadata of {where}: {exc!r}") from exc
        return doc if isinstance(doc, dict) else {}

    def _choose_contract(self, metadata: Mapping[str, Any], info: ModelInfo) -> None:
        """The declared contract, or the one the server's inputs show; the tensor contract's names."""
        inputs = [t for t in metadata.get("inputs") or [] if isinstance(t, dict)]
        outputs = [t.get("name") for t in metadata.get("outputs") or [] if isinstance(t, dict)]
        if self.contract is None:
            worker = any(t.get("name") == "image" and t.get("datatype") == "UINT8" for t in inputs)
            self.contract = "image" if worker else "tensor"
        if self.contract == "image":
            self._tensors = _WORKER_TENSORS
            return
        floats = [t for t in inputs if t.get("datatype") == "FP32"]
        if not inputs and not outputs:  # a server that lists no tensors: the exported file's names
            floats, outputs = [{"name": "input"}], ["logits"]
        if len(floats) != 1 or not outputs:
            raise WorkerError(
                f"model {self.model!r} at {self.url} has inputs {[t.get('name') for t in inputs]} and "
                f"outputs {outputs}; the tensor contract wants one FP32 input (N, C, H, W) and logits"
            )
        self._tensors = _Tensors(
            str(floats[0]["name"]),
            "logits" if "logits" in outputs else str(outputs[0]),
            info.image_size * (info.grid if info.kind == "collage" else 1),
            info.channels,
        )
        self._prefixes.clear()

    def at(self, url: str) -> HttpTransport:
        """The same model, described the same way, at a new address (the server moved)."""
        moved = HttpTransport(url, self.model, self.token, model_file=self.model_file, facts=self.declared,
                              contract=self.contract)  # fmt: skip
        moved._tensors = self._tensors
        return moved

    def close(self) -> None:
        """Close the idle keep-alive connections (calls in flight finish on theirs)."""
        self._client.close()


def _file_facts(path: Path) -> dict[str, Any]:
    from collage_inference.onnxfile import read_onnx_meta  # onnx is needed only here

    try:
        return read_onnx_meta(path).facts()
    except ModelError as exc:
        raise WorkerError(f"model_file {path}: {exc}") from exc
