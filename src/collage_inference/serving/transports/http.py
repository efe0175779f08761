"""A model server over HTTP, speaking the Open Inference Protocol (KServe V2, binary tensors).

Every request the front end admits costs at least one call, so the call's CPU is latency on a
small machine: images go as one binary ``image`` tensor (UINT8 N, H, W, C) behind a JSON header
that depends on their shape alone, so head and header are rendered once per shape and each call
is one write of that prefix and the pixels. Probes and metadata use the same client.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable

import numpy as np

from collage_inference.errors import ProtocolError, WorkerDownError, WorkerError
from collage_inference.serving.kept import Kept
from collage_inference.serving.transports.base import Inference, ModelInfo
from collage_inference.serving.v2 import (
    HEADER_LENGTH,
    InferRequest,
    InferTensor,
    RequestedOutput,
    V2Parser,
    render_infer_request,
)
from collage_inference.serving.web.client import HttpClient, HttpReply

_WANT = (RequestedOutput("probabilities", binary=True),)
_WORKER_TIMINGS = ("queue_ms", "compute_ms", "injected_ms")
_LENGTH = HEADER_LENGTH.lower()


class HttpTransport:
    """One V2 model server at ``url`` serving ``model``. Lives on the front end's event loop."""

    # An HTTP call cannot be taken back from the server's queue; closing its keep-alive
    # connection would cost more than reading the reply.
    cancellable = False

    def __init__(self, url: str, model: str, token: str | None = None) -> None:
        self.url = self.name = url.rstrip("/")
        self.model, self.token = model, token
        self._client = HttpClient(self.url)
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._prefixes: Kept[tuple[int, ...], bytes] = Kept(16)  # image shape -> head + JSON header
        self._parser = V2Parser()

    def infer(self, images: np.ndarray, timeout: float) -> Awaitable[Inference]:
        """Send uint8 images (N, H, W, C), written now when a keep-alive connection is idle."""
        try:
            pixels = images.astype(np.uint8, copy=False).tobytes()
            reply = self._client.send(self._prefix(images.shape) + pixels, timeout)
        except OSError as exc:  # the write itself failed: the connection is broken
            raise WorkerDownError(f"worker {self.url} failed: {exc!r}") from exc
        return self._result(reply)

    def _prefix(self, shape: tuple[int, ...]) -> bytes:
        prefix = self._prefixes.get(shape)
        if prefix is None:
            request = InferRequest(None, (InferTensor.of("image", np.zeros(shape, np.uint8)),), _WANT)
            body, headers = render_infer_request(request, binary_inputs=True)
            header = body[: int(headers[HEADER_LENGTH])]
            head = self._client.head(
                "POST", f"/v2/models/{self.model}/infer", {**headers, **self._auth},
                len(header) + math.prod(shape),
            )  # fmt: skip
            prefix = self._prefixes.keep(shape, head + header)
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
            probabilities = response.output("probabilities").data
        except ProtocolError as exc:
            raise WorkerDownError(f"worker {self.url} answered garbage: {exc}") from exc
        params = response.parameters
        return Inference(
            probabilities, {k[:-3]: float(params[k]) / 1e3 for k in _WORKER_TIMINGS if k in params}
        )

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
        """The model's V2 metadata: its facts are the metadata ``parameters``."""
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
        parameters = doc.get("parameters") if isinstance(doc, dict) else None
        return ModelInfo.from_facts(self.model, parameters if isinstance(parameters, dict) else {})

    def close(self) -> None:
        """Close the idle keep-alive connections (calls in flight finish on theirs)."""
        self._client.close()
