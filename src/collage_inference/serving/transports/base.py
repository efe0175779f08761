"""The transport interface: what the front end needs of a model server, and nothing more."""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from collage_inference.errors import WorkerError

# The model facts every model server publishes (V2 metadata parameters, a Ray replica's
# describe()), under these keys.
FACT_KEYS = ("kind", "grid", "labels", "image_size", "channels")
PARITY_KEYS = ("parity_k", "encoder")  # and, for a ParM parity model, these


@dataclass(frozen=True)
class ModelInfo:
    """What a model server says about the model it serves."""

    model: str
    kind: str  # "scnn", "collage" or "parity"
    grid: int
    labels: tuple[str, ...]
    image_size: int  # s-CNN input side, or collage tile side
    channels: int
    parity_k: int = 0  # a parity model: images per parity query
    encoder: str = ""  # a parity model: how the query is coded (collage_inference.parm)

    @classmethod
    def from_facts(cls, model: str, facts: Mapping[str, Any]) -> ModelInfo:
        """From a server's published facts; a WorkerError names what is missing."""
        try:
            return cls(
                model,
                str(facts["kind"]),
                int(facts["grid"]),
                tuple(str(label) for label in facts["labels"]),
                int(facts["image_size"]),
                int(facts["channels"]),
                int(facts.get("parity_k", 0)),
                str(facts.get("encoder", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise WorkerError(
                f"the metadata of model {model!r} lacks a usable {exc}; a collage-inference model "
                f"server publishes {', '.join(FACT_KEYS)} as metadata parameters"
            ) from None

    def expected_shape(self, count: int) -> tuple[int, ...]:
        """The probabilities this model answers for ``count`` inputs."""
        if self.kind == "collage":
            return (count, self.grid * self.grid, len(self.labels))
        return (count, len(self.labels))


@dataclass(frozen=True, eq=False)
class Inference:
    """probabilities: (N, classes) or (N, S*S, classes + 1); timings in seconds."""

    probabilities: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)


class Transport(Protocol):
    """One model server as the front end reaches it.

    ``infer`` starts the call before it returns (an HTTP transport writes the request at once)
    and gives an awaitable of the result. A transport raises :class:`WorkerError` when a call
    fails and :class:`~collage_inference.errors.WorkerDownError` when the server cannot take
    calls at all (connection refused, timeout, garbage, a 5xx); it keeps no accounting of its
    own: the pool does that.
    """

    name: str  # where it points, for logs and metric labels (a URL, serve://app/deployment)
    cancellable: bool  # True: cancelling a call drops it from the server's queue

    def infer(self, images: np.ndarray, timeout: float) -> Awaitable[Inference]: ...

    async def ready(self, timeout: float = 1.0) -> bool: ...

    async def describe(self, timeout: float = 5.0) -> ModelInfo: ...

    def close(self) -> None: ...
