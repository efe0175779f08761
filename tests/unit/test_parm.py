"""ParM's coding: the concatenation and sum encoders and the subtraction decoder."""

from __future__ import annotations

import numpy as np
import pytest

from collage_inference.errors import ConfigError, GeometryError
from collage_inference.modelspec import ModelConfig
from collage_inference.parm import concat_parts, decode, encode


def _groups(b: int, k: int, size: int = 8, channels: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (b, k, size, size, channels), dtype=np.uint8)


def test_concat_k2_puts_two_half_width_images_side_by_side() -> None:
    groups = np.zeros((1, 2, 8, 8, 1), np.uint8)
    groups[0, 0], groups[0, 1] = 200, 50
    query = encode(groups, "concat")
    assert query.shape == (1, 8, 8, 1) and query.dtype == np.uint8
    assert np.all(query[0, :, :4] == 200) and np.all(query[0, :, 4:] == 50)


def test_concat_k4_fills_the_quadrants_row_major() -> None:
    groups = np.zeros((2, 4, 8, 8, 3), np.uint8)
    for i in range(4):
        groups[:, i] = 10 + 60 * i
    query = encode(groups, "concat")
    assert query.shape == (2, 8, 8, 3)
    quadrants = [query[:, :4, :4], query[:, :4, 4:], query[:, 4:, :4], query[:, 4:, 4:]]
    assert [int(q.mean()) for q in quadrants] == [10, 70, 130, 190]


def test_the_parts_are_the_images_downsampled() -> None:
    images = _groups(3, 1, size=8)[:, 0]
    assert concat_parts(images, 2).shape == (3, 8, 4, 1) and concat_parts(images, 4).shape == (3, 4, 4, 1)
    flat = np.full((1, 8, 8, 1), 77, np.uint8)
    assert np.all(concat_parts(flat, 4) == 77)  # a constant image stays constant


def test_sum_encoder_sends_the_mean_image() -> None:
    groups = _groups(5, 4, channels=3)
    expected = np.rint(groups.astype(np.float64).mean(axis=1)).astype(np.uint8)
    np.testing.assert_array_equal(encode(groups, "sum"), expected)


def test_subtraction_recovers_the_missing_output_exactly_when_the_parity_is_exact() -> None:
    outputs = np.random.default_rng(1).normal(size=(6, 4, 10)).astype(np.float32)  # (groups, k, C)
    parity = outputs.sum(axis=1)
    for missing in range(4):
        others = np.delete(outputs, missing, axis=1)
        np.testing.assert_allclose(decode(parity, others), outputs[:, missing], atol=1e-5)


def test_undefined_codes_are_refused() -> None:
    with pytest.raises(GeometryError, match="k = 2 or 4"):
        encode(_groups(1, 3), "concat")
    with pytest.raises(GeometryError, match="encoder"):
        encode(_groups(1, 2), "xor")
    with pytest.raises(GeometryError, match="even"):
        encode(_groups(1, 2, size=7), "concat")
    with pytest.raises(GeometryError, match="uint8"):
        encode(_groups(1, 2).astype(np.float32), "sum")
    with pytest.raises(ConfigError, match="k = 2 or 4"):
        ModelConfig("parity", 10, parity_k=3, encoder="concat")
    with pytest.raises(ConfigError, match="parity models only"):
        ModelConfig("scnn", 10, parity_k=2)
    assert ModelConfig("parity", 10, parity_k=3, encoder="sum").parity_k == 3
