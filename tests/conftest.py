"""Shared fixtures: the real CIFAR-10 JPEGs from ../shared/data, extracted once into a cache folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CIFAR_ARCHIVE = Path(os.environ.get("FASTSE_CIFAR_ARCHIVE", REPO.parent / "shared/data/cifar10-jpeg.tar.zst"))
CACHE = Path(os.environ.get("FASTSE_TEST_CACHE", Path.home() / ".cache/fastse/test-data"))


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    """Root of the real CIFAR-10 JPEG tree: train/<class>/*.jpg (5,000 a class), test/<class>/*.jpg."""
    from fastse.pipelines.datasets import resolve_data

    if os.environ.get("FASTSE_CIFAR_DIR"):  # an already extracted tree (machines without zstd)
        return Path(os.environ["FASTSE_CIFAR_DIR"])
    if not CIFAR_ARCHIVE.is_file():
        pytest.fail(f"CIFAR-10 archive not found at {CIFAR_ARCHIVE} (set FASTSE_CIFAR_ARCHIVE)")
    return resolve_data(CIFAR_ARCHIVE, cache_dir=CACHE)
