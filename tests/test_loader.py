"""build_loader: backend choice, recipe and statistics, splits, and its errors, on a small tree of real
CIFAR-10 JPEGs (20 a class for train, 5 for test)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fastse.pipelines import loader as loader_mod
from fastse.pipelines.dali_backend import dali_available
from fastse.pipelines.datasets import DataError, ImageFolderIndex, scan_image_folder
from fastse.pipelines.loader import build_loader, choose_backend
from fastse.pipelines.recipes import CIFAR10_MEAN, IMAGENET_MEAN, get_recipe
from fastse.pipelines.tensor_backend import TensorLoader

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tree(cifar10_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar-small")
    for split, count in (("train", 20), ("test", 5)):
        for class_dir in sorted((cifar10_dir / split).iterdir()):
            dest = root / split / class_dir.name
            dest.mkdir(parents=True)
            for f in sorted(class_dir.glob("*.jpg"))[:count]:
                shutil.copy(f, dest / f.name)
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _index(side: int | list[int], n: int = 100) -> ImageFolderIndex:
    sides = np.resize(np.asarray(side), n)
    return ImageFolderIndex(root=Path("/data/x"), classes=["a"], files=[Path("/data/x/a/0.jpg")] * n,
                            labels=np.zeros(n, dtype=np.int64), sizes=np.stack([sides, sides], 1))


def test_auto_builds_the_tensor_loader_for_cifar(tree, cache):
    loader = build_loader("byol", tree, batch_size=32, device="cpu", cache_dir=cache)
    assert isinstance(loader, TensorLoader) and len(loader) == 200 // 32
    assert loader.recipe.size == 32 and len(loader.recipe.views) == 2
    assert np.allclose(loader.recipe.mean, CIFAR10_MEAN, atol=0.05)  # measured on the data
    views, labels = next(iter(loader))
    assert [tuple(v.shape) for v in views] == [(32, 3, 32, 32)] * 2 and labels.dtype == torch.int64
    assert set(labels.tolist()) <= set(range(10))
    again = next(iter(build_loader("byol", tree, batch_size=32, device="cpu", cache_dir=cache)))
    assert all(torch.equal(a, b) for a, b in zip(views, again[0], strict=True))  # same seed, same batch


def test_splits_indices_recipe_objects_and_dtypes(tree, cache):
    test = build_loader("eval", tree, split="test", batch_size=16, device="cpu", cache_dir=cache)
    assert len(test) == 50 // 16
    sub = build_loader("fixmatch", tree, batch_size=16, device="cpu", cache_dir=cache, indices=np.arange(0, 200, 2),
                       backend="tensor", dtype=torch.bfloat16, channels_last=True)
    assert len(sub) == 100 // 16
    views, _ = next(iter(sub))
    assert views[1].dtype == torch.bfloat16 and views[1].is_contiguous(memory_format=torch.channels_last)
    recipe = get_recipe("linear", 32)  # a Recipe object keeps its own statistics
    index = scan_image_folder(tree, split="train")
    assert build_loader(recipe, index, batch_size=16, device="cpu", cache_dir=cache).recipe.mean == IMAGENET_MEAN


def test_errors_are_clear(tree, cache):
    kw = dict(batch_size=16, device="cpu", cache_dir=cache)
    with pytest.raises(ValueError, match="unknown loader backend 'fast'"):
        build_loader("byol", tree, backend="fast", **kw)
    with pytest.raises(ValueError, match="unknown recipe 'swav'"):
        build_loader("swav", tree, **kw)
    with pytest.raises(ValueError, match="built for 32 px"):
        build_loader(get_recipe("byol", 32), tree, size=64, **kw)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        build_loader("byol", tree, batch_size=128, world_size=2, device="cpu", cache_dir=cache)
    with pytest.raises(DataError, match="no val/ folder"):
        build_loader("byol", tree, split="val", **kw)
    with pytest.raises(DataError, match=str(tree / "missing")):
        build_loader("byol", tree / "missing", **kw)
    if not dali_available():
        with pytest.raises(ImportError, match="pip install"):
            build_loader("byol", tree, backend="dali", **kw)


def test_auto_choice(monkeypatch):
    assert choose_backend(_index(32), CPU)[0] == "tensor"
    assert choose_backend(_index(64), CPU)[0] == "tensor"
    big = choose_backend(_index(96), CPU)
    assert big[0] == ("dali" if dali_available() else "tensor")
    monkeypatch.setattr(loader_mod, "_free_bytes", lambda device: 1000)  # nothing fits
    assert choose_backend(_index(32), CPU)[0] == "tensor"  # on CPU small images always go to tensors
    if dali_available():
        assert choose_backend(_index(96), CPU)[0] == "dali"
        assert choose_backend(_index([96, 120]), CPU)[0] == "dali"
    else:
        with pytest.raises(ImportError, match="too large"):
            choose_backend(_index(96), CPU)
        with pytest.raises(ImportError, match="differ in size"):
            choose_backend(_index([96, 120]), CPU)
    with pytest.raises(DataError, match="50 of 100 images are not 32x32 px"):  # small images: one size, any backend
        choose_backend(_index([32, 40]), CPU)
