"""The small frozen records that the serving stages pass to each other.

    Request --grouper--> Group --encoder--> Collage --worker--> Reply --decoder--> Answer
                                                                         \\-> Reissue | Fail

Records holding NumPy arrays use ``eq=False`` (identity equality): element-wise array
comparison has no single truth value, and no stage needs value equality of images.
Sources and close reasons are ``StrEnum``s, so they compare equal to, and render as, plain strings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

import numpy as np

from collage_inference.errors import DeadlineExceededError, ProtocolError, ServingError, UnavailableError

_NO_TIMINGS: Mapping[str, float] = MappingProxyType({})
_FP32, _UINT8 = np.dtype(np.float32), np.dtype(np.uint8)


class Source(StrEnum):
    """Which path answered a request."""

    PRIMARY = "primary"  # the s-CNN call sent at admission
    COLLAGE = "collage"  # the request's cell of the collage-CNN answer (the backup)
    REPLICA = "replica"  # an s-CNN call re-issued after primary and backup were both late
    PARITY = "parity"  # mode parm: decoded from the group's parity answer by subtraction (ParM)


class CloseReason(StrEnum):
    """Why the grouper closed a group."""

    FULL = "full"  # all k = S*S cells taken
    DEADLINE = "deadline"  # the group deadline passed: a partial collage with empty cells
    FLUSH = "flush"  # the caller asked (shutdown, drain, mode switch)


@dataclass(frozen=True, eq=False)
class Request:
    """One client image, uint8 (H, W, C) of any size (the encoder and the workers resize it).
    arrival and deadline are monotonic seconds; past the end-to-end deadline the client gets 504."""

    id: str
    image: np.ndarray
    arrival: float
    deadline: float

    def __post_init__(self) -> None:
        if not isinstance(self.image, np.ndarray) or self.image.dtype != _UINT8 or self.image.ndim != 3:
            shape = getattr(self.image, "shape", None)
            dtype = getattr(self.image, "dtype", type(self.image).__name__)
            raise ProtocolError(f"request {self.id}: an image must be uint8 (H, W, C), got {dtype} {shape}")
        if self.deadline < self.arrival:
            raise ProtocolError(
                f"request {self.id}: deadline {self.deadline} is before arrival {self.arrival}"
            )


@dataclass(frozen=True, eq=False)
class Group:
    """The requests covered by one backup query, in cell order (cell = row * S + col); cells
    ``len(requests)`` .. ``k - 1`` are empty. k is S*S for a collage, ``size`` for a code that
    is not a square grid (ParM's k = 2). Times are monotonic seconds."""

    id: int
    grid: int
    requests: tuple[Request, ...]
    opened_at: float
    closed_at: float
    reason: CloseReason
    size: int = 0  # k when it is not grid * grid

    @property
    def k(self) -> int:
        return self.size or self.grid * self.grid

    @property
    def request_ids(self) -> tuple[str, ...]:
        return tuple(r.id for r in self.requests)

    @property
    def empty_cells(self) -> int:
        return self.k - len(self.requests)

    def cell_of(self, request_id: str) -> int:
        """The cell holding ``request_id``; KeyError if it is not in this group."""
        for cell, request in enumerate(self.requests):
            if request.id == request_id:
                return cell
        raise KeyError(f"request {request_id} is not in group {self.id}")


@dataclass(frozen=True, eq=False)
class Prediction:
    """One classification: of a single image, or of one collage cell."""

    label: int
    confidence: float
    probabilities: np.ndarray | None = None  # (classes,) float32, softmax


@dataclass(frozen=True, eq=False)
class Reply:
    """What a worker answered for one s-CNN call (1 prediction) or one collage (k, by cell), for exactly
    one of request_id (s-CNN: primary or replica) and group_id (collage); timings in seconds, by name."""

    source: Source
    worker_id: str
    predictions: tuple[Prediction, ...]
    request_id: str | None = None
    group_id: int | None = None
    timings: Mapping[str, float] = field(default_factory=lambda: _NO_TIMINGS)

    def __post_init__(self) -> None:
        if (self.request_id is None) == (self.group_id is None):
            raise ServingError("a reply names exactly one of request_id (s-CNN) and group_id (collage)")

    @classmethod
    def from_probabilities(
        cls,
        source: Source,
        worker_id: str,
        probabilities: np.ndarray,
        *,
        request_id: str | None = None,
        group_id: int | None = None,
        timings: Mapping[str, float] | None = None,
    ) -> Reply:
        """Build a reply from softmax scores: (classes,) for one image or (k, classes) for a
        collage. Argmax and confidence are computed for all cells at once."""
        timings = dict(timings or {})
        if isinstance(probabilities, np.ndarray) and probabilities.ndim == 1 and probabilities.dtype == _FP32:
            # One image, the hot path: its few scores in plain Python, since on a server that idles
            # between requests NumPy's first calls after a pause cost tens of microseconds each.
            scores = probabilities.tolist()
            if scores and all(map(math.isfinite, scores)):  # NaN would make max() order-dependent
                label = scores.index(max(scores))  # the first of equal maxima, as argmax
                prediction = Prediction(label, scores[label], probabilities)
                return cls(source, worker_id, (prediction,), request_id, group_id, timings)
        probs = np.asarray(probabilities, dtype=np.float32)
        probs = probs[None, :] if probs.ndim == 1 else probs  # (n, classes)
        if probs.ndim != 2 or probs.shape[1] == 0:
            raise ServingError(f"probabilities must be (classes,) or (cells, classes), got {probs.shape}")
        labels = probs.argmax(axis=1)
        confidences = probs[np.arange(len(probs)), labels]
        predictions = tuple(
            Prediction(int(label), float(conf), row)
            for label, conf, row in zip(labels, confidences, probs, strict=True)
        )
        return cls(source, worker_id, predictions, request_id, group_id, timings)


@dataclass(frozen=True, eq=False)
class Answer:
    """The one final answer to a request. latency is admission to answer, in seconds."""

    request_id: str
    label: int
    class_name: str
    confidence: float
    source: Source
    latency: float
    worker_id: str
    timings: Mapping[str, float] = field(default_factory=lambda: _NO_TIMINGS)
    probabilities: np.ndarray | None = None


@dataclass(frozen=True)
class Reissue:
    """Send the request again, as a replica, to the fastest idle worker other than ``exclude_worker``
    (the straggler, when known); attempt counts from 1. optional: an earlier s-CNN call still runs
    (the re-issue is for lateness), so the IO layer may skip it and report that to the decoder."""

    request_id: str
    exclude_worker: str | None
    attempt: int
    optional: bool = False


@dataclass(frozen=True)
class Fail:
    """Give up on the request: 504 (its deadline passed) or 503 (every path failed, no re-issue left)."""

    request_id: str
    status: int
    message: str

    def error(self) -> ServingError:
        """The exception the HTTP layer converts into the response, in its one place."""
        return DeadlineExceededError(self.message) if self.status == 504 else UnavailableError(self.message)


Action = Answer | Reissue | Fail
