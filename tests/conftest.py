"""Shared fixtures: paths to the shipped models and the real Fashion-MNIST test split."""

from __future__ import annotations

from pathlib import Path

import pytest

from collage_inference.data import ImageDataset, load_dataset

REPO = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO / "models" / "fashion-mnist"


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return MODELS_DIR


@pytest.fixture(scope="session")
def fashion_test() -> ImageDataset:
    return load_dataset("fashion-mnist", "test")
