# --- fixtures for the pure front-end stages (grouper, encoder, decoder) ---

import itertools
from collections.abc import Callable

import numpy as np
import pytest

from collage_inference.serving.clock import FakeClock
from collage_inference.serving.types import Request


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_request() -> Callable[..., Request]:
    """Factory: make_request(arrival, *, deadline=arrival + 1.0, shape=(8, 8, 1), fill=None)."""
    ids = itertools.count()

    def make(
        arrival: float = 0.0,
        *,
        deadline: float | None = None,
        shape: tuple[int, int, int] = (8, 8, 1),
        fill: int | None = None,
        request_id: str | None = None,
    ) -> Request:
        n = next(ids)
        value = n % 256 if fill is None else fill
        image = np.full(shape, value, np.uint8)
        rid = request_id if request_id is not None else f"r{n}"
        return Request(rid, image, arrival, arrival + 1.0 if deadline is None else deadline)

    return make
