"""Shared fixtures: the real CIFAR-10 JPEGs from ../shared/data, extracted once into a cache folder."""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CIFAR_ARCHIVE = Path(os.environ.get("FASTSE_CIFAR_ARCHIVE", REPO.parent / "shared/data/cifar10-jpeg.tar.zst"))
CACHE = Path(os.environ.get("FASTSE_TEST_CACHE", Path.home() / ".cache/fastse/test-data"))


def _extract_zst(archive: Path, dest: Path) -> None:
    import zstandard

    with archive.open("rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as stream:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            tar.extractall(dest, filter="data")


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    """Root of the real CIFAR-10 JPEG tree: train/<class>/*.jpg (5,000 a class), test/<class>/*.jpg."""
    if not CIFAR_ARCHIVE.is_file():
        pytest.fail(f"CIFAR-10 archive not found at {CIFAR_ARCHIVE} (set FASTSE_CIFAR_ARCHIVE)")
    digest = hashlib.sha256(str(CIFAR_ARCHIVE.stat().st_size).encode() + CIFAR_ARCHIVE.name.encode()).hexdigest()[:12]
    root = CACHE / f"cifar10-{digest}"
    done = root / ".complete"
    if not done.exists():
        tmp = CACHE / f".tmp-{os.getpid()}"
        tmp.mkdir(parents=True, exist_ok=True)
        _extract_zst(CIFAR_ARCHIVE, tmp)
        inner = next(p for p in [tmp, *tmp.iterdir()] if (p / "train").is_dir())
        root.parent.mkdir(parents=True, exist_ok=True)
        if root.exists():
            import shutil

            shutil.rmtree(root)
        inner.rename(root)
        done.touch()
    return root
