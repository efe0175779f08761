"""Mode ``parm``: ParM's encoder and subtraction decoder on the front end's own stages.

The grouper forms groups of the parity model's k exactly as it forms collage groups (same
deadline rule), :class:`ParityEncoder` turns each group into one parity query
(:func:`collage_inference.parm.encode`), a parity worker answers it, and :class:`ParityBook`
keeps, per group, the s-CNN outputs in hand and the parity output: when exactly one member has
no s-CNN output, its output is recovered as ``F_P(P) - sum of the others`` and the decoder
treats it as that request's backup answer (source ``parity``). With two or more members
missing ParM has nothing to offer; the decoder re-issues them as in every mode, and decodes
the last one if the others' outputs arrive while it still waits.

Departures from ParM's code, both of plumbing:

- **Log-probabilities stand in for logits.** Every worker answers softmax probabilities (the
  worker contract). ``log p = logits - logsumexp(logits)`` differs from the logits by one
  constant per vector, so the subtraction on log-probabilities differs from the one on logits by
  a constant across classes, which changes neither its argmax nor its softmax. It is exact
  unless a probability underflows float32 (a logit gap above ~87; the shipped s-CNN's largest
  on the test set is about 11, its parity models' about 23), and
  ``tests/unit/serving/test_parity.py`` checks it against the logits on the test set.
- **Partial groups.** ParM's front end codes only full groups. A group of n < k requests that
  the group deadline closes early fills its k slots with its own images in turn (slot i holds
  member i mod n), so the parity output approximates ``sum_j c_j F(X_j)`` with known counts
  ``c_j``, and the missing member's output is ``(F_P(P) - sum of c_j F(X_j) over the others) / c_i``.
  Repeating members keeps the query like the groups the parity model was trained on; black
  images in the empty slots are not, and cost a k = 4 model most of its accuracy on groups of
  one or two (docs/parm-comparison.md has the figures).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from collage_inference.errors import ConfigError
from collage_inference.grid import fit_image
from collage_inference.parm import check_code, decode, encode
from collage_inference.serving.runtime import softmax
from collage_inference.serving.types import Group, Prediction, Reply

_TINY = np.finfo(np.float32).tiny  # floor before the log: 0 would make the subtraction infinite


def log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(np.asarray(probabilities, np.float32), _TINY))


@dataclass(frozen=True)
class ParityCode:
    """What the front end learns of its parity workers: the code (k, encoder) and the input
    (size, channels) of the s-CNN it stands in for."""

    k: int
    encoder: str
    size: int
    channels: int


def slot_counts(members: int, k: int) -> tuple[int, ...]:
    """How many of the k slots each of ``members`` images fills (slot i holds member i mod n)."""
    return tuple(len(range(m, k, members)) for m in range(members))


@dataclass(frozen=True, eq=False)
class ParityQuery:
    """One encoded group: uint8 pixels (H, W, C) at the s-CNN's input size."""

    group_id: int
    pixels: np.ndarray


class ParityEncoder:
    """Codes groups of up to ``k`` images into parity queries of ``size`` x ``size`` x ``channels``."""

    def __init__(self, k: int, encoder: str, size: int, channels: int) -> None:
        check_code(k, encoder)
        if size < 2 or channels not in (1, 3):
            raise ConfigError(f"a parity query needs a side >= 2 and 1 or 3 channels, got {size}, {channels}")
        self.k, self.encoder, self.size, self.channels = k, encoder, size, channels

    def encode(self, group: Group) -> ParityQuery:
        if len(group.requests) > self.k:
            raise ConfigError(f"group {group.id} holds {len(group.requests)} requests, more than k={self.k}")
        fitted = [fit_image(r.image, self.size, self.channels) for r in group.requests]
        images = np.stack([fitted[slot % len(fitted)] for slot in range(self.k)])[None]
        return ParityQuery(group.id, encode(images, self.encoder)[0])


@dataclass(slots=True)
class _Group:
    members: tuple[str, ...]
    counts: tuple[int, ...]  # slots each member fills (more than one in a partial group)
    parity: np.ndarray | None = None  # the parity model's log-probabilities
    reply: Reply | None = None
    decoded: bool = False


class ParityBook:
    """Pure bookkeeping for the subtraction decoder; ``recent``: s-CNN outputs and groups
    remembered at most (oldest dropped)."""

    def __init__(self, k: int, recent: int = 4096) -> None:
        if k < 2 or recent < 1:
            raise ConfigError(f"a parity book needs k >= 2 and recent >= 1, got k={k}, recent={recent}")
        self.k = k
        self.recent = recent
        self._outputs: OrderedDict[str, np.ndarray] = OrderedDict()  # request id -> log-probabilities
        self._groups: OrderedDict[int, _Group] = OrderedDict()
        self._group_of: dict[str, int] = {}

    def add_group(self, group: Group) -> None:
        """The group's parity query was sent."""
        members = group.request_ids
        self._groups[group.id] = _Group(members, slot_counts(len(members), self.k))
        for request_id in members:
            self._group_of[request_id] = group.id
        while len(self._groups) > self.recent:
            self.drop(next(iter(self._groups)))

    def missing(self, group_id: int) -> list[str]:
        """The group's members with no s-CNN output yet."""
        group = self._groups.get(group_id)
        return [] if group is None else [m for m in group.members if m not in self._outputs]

    def scnn_output(self, request_id: str, probabilities: np.ndarray) -> list[tuple[str, Prediction, Reply]]:
        """An s-CNN answered ``request_id``; returns the member it lets the decoder recover, if any."""
        self._outputs[request_id] = log_probabilities(probabilities)
        self._outputs.move_to_end(request_id)
        while len(self._outputs) > self.recent:
            self._outputs.popitem(last=False)
        group_id = self._group_of.get(request_id)
        return [] if group_id is None else self._decode(group_id)

    def parity_output(self, group_id: int, reply: Reply) -> list[tuple[str, Prediction, Reply]]:
        """The parity worker answered (one prediction, its softmax scores); returns the member
        recovered, if exactly one is missing."""
        group = self._groups.get(group_id)
        scores = reply.predictions[0].probabilities if len(reply.predictions) == 1 else None
        if group is None or scores is None:
            return []
        group.parity, group.reply = log_probabilities(scores), reply
        return self._decode(group_id)

    def drop(self, group_id: int) -> None:
        """Forget a group (its parity call failed, it was not sent, or it is settled)."""
        group = self._groups.pop(group_id, None)
        if group is None:
            return
        for request_id in group.members:
            if self._group_of.get(request_id) == group_id:
                del self._group_of[request_id]
            self._outputs.pop(request_id, None)

    def _decode(self, group_id: int) -> list[tuple[str, Prediction, Reply]]:
        group = self._groups[group_id]
        missing = self.missing(group_id)
        if not missing:
            self.drop(group_id)  # every member has its s-CNN output: nothing left to recover
            return []
        if group.parity is None or group.reply is None or group.decoded or len(missing) > 1:
            return []
        group.decoded = True
        lost = group.members.index(missing[0])
        others = [i for i in range(len(group.members)) if i != lost]
        available = [group.counts[i] * self._outputs[group.members[i]] for i in others]
        output = decode(group.parity, np.stack(available)) if available else group.parity
        probabilities = softmax(output / group.counts[lost])
        label = int(probabilities.argmax())
        return [(missing[0], Prediction(label, float(probabilities[label]), probabilities), group.reply)]
