"""Parses kept for reuse: a client sends the same heads and headers with every request of a
shape, so the serving path parses each once and looks it up by its bytes afterwards.

:class:`Kept` is a plain dict (lookups stay C-speed) that holds at most ``limit`` entries and
lets the oldest go first, so a client that never repeats itself cannot grow it.
"""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Kept(dict[K, V]):
    """At most ``limit`` entries; :meth:`keep` adds one, dropping the oldest when full."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def keep(self, key: K, value: V) -> V:
        """Add ``key`` -> ``value`` and give ``value`` back."""
        if len(self) >= self.limit:
            del self[next(iter(self))]  # the oldest
        self[key] = value
        return value
