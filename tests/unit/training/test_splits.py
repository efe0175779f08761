"""Training subsets and validation splits are seeded samples stratified by class, so a dataset
stored class by class (an image folder) gives every class to both."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from collage_inference.data import load_dataset
from collage_inference.data.base import ImageDataset
from collage_inference.errors import ConfigError, DataFormatError
from collage_inference.training.train import split_training


def _sorted(counts: list[int]) -> ImageDataset:
    labels = np.repeat(np.arange(len(counts)), counts)
    ids = np.arange(len(labels))
    images = np.stack([ids // 256, ids % 256], 1).astype(np.uint8).reshape(-1, 2, 1, 1)  # own id
    return ImageDataset("sorted", "train", images, labels, tuple(f"c{i}" for i in range(len(counts))))


def _ids(data: ImageDataset) -> np.ndarray:
    return data.images[:, 0, 0, 0].astype(int) * 256 + data.images[:, 1, 0, 0]


def test_a_sample_keeps_each_class_share_and_the_seed_fixes_it() -> None:
    data = _sorted([300, 300, 200, 100, 100])
    chosen, rest = data.stratified(100, seed=3)
    assert np.bincount(chosen.labels).tolist() == [30, 30, 20, 10, 10]
    assert len(rest) == 900 and not set(_ids(chosen)) & set(_ids(rest))
    again, _ = data.stratified(100, seed=3)
    np.testing.assert_array_equal(_ids(again), _ids(chosen))
    other, _ = data.stratified(100, seed=4)
    assert not np.array_equal(_ids(other), _ids(chosen))
    assert np.all(np.diff(_ids(chosen)) > 0) and np.all(np.diff(_ids(rest)) > 0)  # order kept
    with pytest.raises(DataFormatError, match="cannot take"):
        data.stratified(1001, seed=0)


def test_shares_are_rounded_by_largest_remainder() -> None:
    counts = np.bincount(_sorted([5, 3, 2]).stratified(5, 0)[0].labels, minlength=3)
    assert counts.sum() == 5 and counts.tolist() == [3, 1, 1]  # exact shares 2.5, 1.5, 1.0


def test_a_class_sorted_image_folder_trains_and_validates_on_every_class(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for c in range(10):  # read back class by class, as every image folder is
        (tmp_path / "train" / f"class{c}").mkdir(parents=True)
        for i in range(30):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                tmp_path / "train" / f"class{c}" / f"{i}.png"
            )
    full = load_dataset("imagefolder", "train", tmp_path)
    assert full.labels.tolist() == sorted(full.labels.tolist())
    train, val = split_training(full, limit=100, val_size=20, seed=0)
    assert np.bincount(train.labels).tolist() == [8] * 10
    assert np.bincount(val.labels).tolist() == [2] * 10


def test_a_class_left_without_training_images_is_named() -> None:
    data = _sorted([50, 50, 1])
    with pytest.raises(ConfigError, match=r"1 of 3 classes have no training image \(c2\).*--train-limit"):
        split_training(data, limit=20, val_size=5, seed=0)
    with pytest.raises(ConfigError, match="--val-size"):
        split_training(data, limit=None, val_size=101, seed=0)
    train, val = split_training(data, limit=None, val_size=None, seed=0)
    assert len(val) == 10 and len(train) == 91 and 2 in train.labels
