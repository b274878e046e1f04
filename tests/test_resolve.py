"""The one data resolver (`pipelines.resolve`): which split is the test split, the size rule's size, the
small-image threshold, mean/std and --limit, for pretraining, evaluation and FixMatch alike; and where
the three uses differ, that each keeps its own behaviour. Synthetic trees made with PIL, and real
CIFAR-10 JPEGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastse.pipelines import recipes, sizes
from fastse.pipelines.datasets import DataError, dataset_stats
from fastse.pipelines.recipes import CIFAR10_MEAN, CIFAR10_STD, SMALL_SIDE, get_recipe
from fastse.pipelines.resolve import TEST_SPLITS, USES, resolve, subset
from PIL import Image

CLASSES = ("a", "b")


def tree(root: Path, splits: dict[str | None, int], size: tuple[int, int] = (32, 32)) -> Path:
    """root/<split>/<class>/<i>.png (split None: root/<class>/<i>.png), `n` images of each class per split,
    of (height, width) `size`, each a different colour (so measured statistics are not degenerate)."""
    for split, n in splits.items():
        for c, cls in enumerate(CLASSES):
            folder = root / (split or "") / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                colour = (40 * i % 256, 100 + 50 * c, 255 - 30 * i % 256)
                Image.new("RGB", size[::-1], colour).save(folder / f"{i}.png")
    return root


# ------------------------------------------------------------------------------------------- splits


@pytest.mark.parametrize("present, chosen", [(("test", "val"), "test"), (("val",), "val"),
                                             (("valid", "validation"), "validation"), (("valid",), "valid")])
def test_the_test_split_is_the_first_of_test_val_validation_valid(tmp_path, present, chosen):
    root = tree(tmp_path / "d", {"train": 3, **{s: 2 for s in present}})
    for use in USES:
        data = resolve(root, use=use, cache_dir=tmp_path / "cache")
        assert data.test_split == chosen and data.root == root.resolve()
        assert data.test.root == root.resolve() / chosen and len(data.test) == 4 and data.test.classes == list(CLASSES)
        assert len(data.train) == 6 and data.num("train") == 6 and data.num("test") == 4
    assert TEST_SPLITS == ("test", "val", "validation", "valid")


def test_pretraining_reads_a_tree_without_splits_evaluation_and_fixmatch_refuse_it(tmp_path):
    flat = tree(tmp_path / "flat", {None: 3})
    data = resolve(flat, use="pretrain", cache_dir=tmp_path / "cache")
    assert data.train.root == flat.resolve() and len(data.train) == 6
    assert data.test_split is None and data.test is None and data.test_idx is None
    with pytest.raises(DataError, match=r"flat: evaluation needs train/ and test/ \(or val/\) class folders; "
                                        "found neither$"):
        resolve(flat, use="eval")
    with pytest.raises(DataError, match=r"flat: no train/ folder; fastse semi needs train/ and test/ \(or val/\)"):
        resolve(flat, use="semi")


def test_each_use_words_a_missing_split_as_before(tmp_path):
    only_val = tree(tmp_path / "v", {"val": 2})
    with pytest.raises(DataError, match=r"v: no train/ folder \(the tree has val\)$"):
        resolve(only_val, use="pretrain")
    with pytest.raises(DataError, match=r"v: evaluation needs train/ and test/ \(or val/\) class folders; found val$"):
        resolve(only_val, use="eval")
    only_train = tree(tmp_path / "t", {"train": 2})
    assert resolve(only_train, use="pretrain").test_split is None  # no kNN monitor
    with pytest.raises(DataError, match="t: evaluation needs train/ and test/ .* found train$"):
        resolve(only_train, use="eval")
    with pytest.raises(DataError, match=r"t: no test/ or val/ folder; fastse semi evaluates the models on it$"):
        resolve(only_train, use="semi")


def test_pretraining_scans_the_test_split_where_it_is_read_the_others_at_once(tmp_path):
    root = tree(tmp_path / "d", {"train": 3, "test": 2})
    (root / "test" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # corrupt
    data = resolve(root, use="pretrain", cache_dir=tmp_path / "cache")  # rank != 0 never reads it
    assert data.test_split == "test" and len(data.train) == 6
    with pytest.raises(DataError, match="1 corrupt or truncated image"):
        _ = data.test
    for use in ("eval", "semi"):
        with pytest.raises(DataError, match="1 corrupt or truncated image"):
            resolve(root, use=use)


# ------------------------------------------------------------------------------------- size rule


def test_the_size_rule_picks_the_size_and_small_follows_the_one_threshold(tmp_path):
    small = tree(tmp_path / "s", {"train": 3, "test": 1}, size=(32, 32))
    data = resolve(small, use="eval")
    assert (data.size, data.small, data.sizes.small, data.sizes.default_size) == (32, True, True, 32)
    down = resolve(small, use="eval", image_size=16)
    assert (down.size, down.small) == (16, True)
    up = resolve(small, use="eval", image_size=96)  # small images trained above the threshold: large recipes
    assert (up.size, up.small, up.sizes.small) == (96, False, True)

    large = tree(tmp_path / "l", {"train": 3, "test": 1}, size=(80, 100))
    for use in ("pretrain", "eval"):
        data = resolve(large, use=use)
        assert (data.size, data.small, data.sizes.side) == (sizes.LARGE_SIZE, False, 100)
    data = resolve(large, use="semi")  # held in memory at one size: trained at the images' own (longer) side
    assert (data.size, data.small, data.sizes.shape) == (100, False, (80, 100))
    Image.new("RGB", (120, 90)).save(large / "test" / "b" / "odd.png")
    assert resolve(large, use="eval").num("test") == 3  # large images take any size
    with pytest.raises(DataError, match=r"1 of 9 images are not 80x100 px(.|\n)*held in memory at one size"):
        resolve(large, use="semi")


@pytest.mark.parametrize("side, small", [(SMALL_SIDE, True), (SMALL_SIDE + 1, False)])
def test_one_small_threshold_for_the_size_rule_and_the_recipes(tmp_path, side, small):
    assert SMALL_SIDE == 64 and sizes.SMALL_SIDE is recipes.SMALL_SIDE
    data = resolve(tree(tmp_path / "d", {"train": 2, "test": 1}, size=(side, side)), use="eval")
    assert data.sizes.small is small and data.small is small
    assert data.size == (side if small else sizes.LARGE_SIZE)
    for name in ("byol", "mocov2", "simclr"):  # blur only above the threshold
        blurs = any(op.name == "gaussian_blur" for view in get_recipe(name, side).views for op in view.ops)
        assert blurs is not small, name
    assert (get_recipe("eval", side).views[0].ops == ()) is small  # the test view: the image itself when small


def test_images_of_another_size_are_refused_with_the_count_each_use_gave(tmp_path):
    root = tree(tmp_path / "d", {"train": 5, "test": 2})
    Image.new("RGB", (40, 40)).save(root / "train" / "a" / "odd.png")
    with pytest.raises(DataError, match=r"1 of 11 images are not 32x32 px"):  # the training images, alone first
        resolve(root, use="pretrain")
    for use in ("eval", "semi"):  # the training and the test images, together
        with pytest.raises(DataError, match=r"1 of 15 images are not 32x32 px(.|\n)*odd.png: 40x40 px"):
            resolve(root, use=use)


# ------------------------------------------------------------------------------------------ stats


def test_stats_are_published_for_a_dataset_name_else_measured_and_cached(tmp_path):
    root = tree(tmp_path / "d", {"train": 4, "test": 1})
    cache = tmp_path / "cache"
    assert resolve(root, use="pretrain", dataset="cifar10", cache_dir=cache).stats == (CIFAR10_MEAN, CIFAR10_STD)
    assert not (cache / "stats").exists()
    for use in USES:
        assert resolve(root, use=use, cache_dir=cache).stats == dataset_stats(root, cache_dir=cache)
    [saved] = (cache / "stats").iterdir()
    assert json.loads(saved.read_text())["root"] == str((root / "train").resolve())
    mean, std = resolve(root, use="eval", cache_dir=cache).stats
    assert len(mean) == len(std) == 3 and all(0 < s < 1 for s in std)


def test_a_dataset_name_as_the_data_picks_published_stats_for_evaluation_only(tmp_path, monkeypatch):
    tree(tmp_path / "cifar10", {"train": 4, "test": 1})  # a local folder named like the data set
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    assert resolve("cifar10", use="eval", cache_dir=cache).stats == (CIFAR10_MEAN, CIFAR10_STD)
    for use in ("pretrain", "semi"):  # measured on the folder, as before
        assert resolve("cifar10", use=use, cache_dir=cache).stats == dataset_stats(tmp_path / "cifar10",
                                                                                  cache_dir=cache)
    assert resolve("cifar10", use="eval").stats != resolve("cifar10", use="pretrain", cache_dir=cache).stats


# ------------------------------------------------------------------------------------------ limit


def test_limit_keeps_the_same_fixed_subset_of_each_split(tmp_path):
    root = tree(tmp_path / "d", {"train": 10, "test": 6})
    a = resolve(root, use="pretrain", limit=7)
    b = resolve(root, use="eval", limit=7)
    assert a.train_idx is not None and len(a.train_idx) == 7 and (np.diff(a.train_idx) > 0).all()
    assert (a.train_idx == b.train_idx).all() and (a.train_idx == subset(20, 7)).all()
    assert (a.test_idx == b.test_idx).all() and (a.test_idx == subset(12, 7)).all()
    assert (a.num("train"), a.num("test"), a.limit) == (7, 7, 7)
    assert (a.indices("train") is a.train_idx) and (a.index("test") is a.test)
    whole = resolve(root, use="eval", limit=12)  # a limit of at least a split's size keeps all of it
    assert whole.train_idx is not None and whole.test_idx is None and whole.num("test") == 12
    assert resolve(root, use="semi").train_idx is None and subset(5, None) is None and subset(5, 5) is None
    assert (subset(1000, 10) == np.sort(np.random.default_rng(0).permutation(1000)[:10])).all()


# ------------------------------------------------------------------------------------ real CIFAR-10


def test_real_cifar_jpegs(cifar_subset, tmp_path):
    root = cifar_subset(3, 2)
    cache = tmp_path / "cache"
    data = resolve(str(root), use="eval", dataset="cifar10", limit=20, cache_dir=cache)
    assert (data.test_split, data.size, data.small, data.sizes.verdict) == ("test", 32, True,
                                                                            "small images (median side 32 px)")
    assert (len(data.train), len(data.test), data.num("train"), data.num("test")) == (30, 20, 20, 20)
    assert len(data.train.classes) == 10 and data.stats == (CIFAR10_MEAN, CIFAR10_STD)
    semi = resolve(str(root), use="semi", cache_dir=cache)
    assert semi.size == 32 and semi.sizes.shape == (32, 32) and semi.train_idx is None
    assert semi.stats == dataset_stats(root, cache_dir=cache) != (CIFAR10_MEAN, CIFAR10_STD)  # measured: no name
