"""The data of a run, decided in one place for pretraining (`pretrain.data`), evaluation (`eval.linear`'s
`eval_data`: linear evaluation and kNN) and FixMatch (`semi.data`).

`resolve(spec, use=...)` finds the data (`datasets.resolve_data`: a class-folder tree, an archive of one,
cifar10/cifar100), picks its splits (train/; the test split: the first of TEST_SPLITS present), scans and
checks them (`datasets.scan_image_folder`, the size rule `sizes.image_sizes`), picks the image size and
mean/std (`datasets.dataset_stats`) and applies `limit` (`subset`), and returns them as one `ResolvedData`.

Where the three uses differ, `USES` says how (each keeps what it did before the resolver):
- pretrain: a tree without split folders is the training set, and a test split is optional (no kNN
  monitor without one). The training images are checked alone first; the test split is scanned and
  checked with them only where it is read (`ResolvedData.test`: rank 0's kNN monitor).
- eval, semi: train/ and test/ (or val/) are required, scanned and checked together at once.
- semi: the images are held in memory at one size, large ones too (`ImageSizes.check(one_size=True)`),
  and trained at their own side.
- eval: a dataset name given as the data ("cifar10") means its published mean/std, as `dataset` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from .datasets import (
    SPLIT_NAMES,
    TORCHVISION_SETS,
    DataError,
    ImageFolderIndex,
    dataset_stats,
    resolve_data,
    scan_image_folder,
)
from .recipes import SMALL_SIDE
from .sizes import ImageSizes, image_sizes

TEST_SPLITS = ("test", "val", "validation", "valid")  # the test split: the first of these folders present

Stats = tuple[tuple[float, float, float], tuple[float, float, float]]


@dataclass(frozen=True)
class Use:
    """What one kind of run asks of its data, where the kinds differ. test_required: refuse data without
    train/ and a test split, scanned and size-checked with the training images at once (else a tree without
    split folders is the training set, checked alone, and the test split is optional and read on first use);
    one_size: the images are held in memory at one size, large ones too, and trained at their own side;
    name_stats: a dataset name given as the data (cifar10) picks its published mean/std. no_train / no_test:
    the refusals ({root}: the data's root, {found}: its split folders)."""

    test_required: bool
    no_train: str
    no_test: str = ""
    one_size: bool = False
    name_stats: bool = False


USES = {
    "pretrain": Use(test_required=False, no_train="{root}: no train/ folder (the tree has {found})"),
    "eval": Use(test_required=True, name_stats=True,
                no_train="{root}: evaluation needs train/ and test/ (or val/) class folders; found {found}",
                no_test="{root}: evaluation needs train/ and test/ (or val/) class folders; found {found}"),
    "semi": Use(test_required=True, one_size=True,
                no_train="{root}: no train/ folder; fastse semi needs train/ and test/ (or val/) class folders",
                no_test="{root}: no test/ or val/ folder; fastse semi evaluates the models on it"),
}


def subset(n: int, limit: int | None) -> np.ndarray | None:
    """A fixed random subset of `limit` of n samples (sorted, the same in every run), or None for all."""
    if limit is None or limit >= n:
        return None
    return np.sort(np.random.default_rng(0).permutation(n)[:limit])


@dataclass(frozen=True, eq=False)
class ResolvedData:
    """One data set as a run of `use` reads it. root: the resolved folder; train: its training images;
    test_split: the name of the test split (None: none; only where `use` allows it); sizes: the size rule
    read on the training images; size: the image size (px) chosen; small: small images at a small size (the
    small-image recipes: at most SMALL_SIDE px both); limit: at most this many images of each split
    (`train_idx`, `test_idx`: the fixed subsets, None for all). `test` and `stats` are read on first use."""

    root: Path
    train: ImageFolderIndex
    test_split: str | None
    sizes: ImageSizes
    size: int
    small: bool
    limit: int | None
    train_idx: np.ndarray | None
    use: str
    stats_of: str | Path  # what mean/std are of: a dataset name or the root
    cache_dir: str | Path | None = None

    @cached_property
    def test(self) -> ImageFolderIndex | None:
        """The test split, scanned with the training classes and checked with the training images by the
        size rule (None without one)."""
        if self.test_split is None:
            return None
        test = scan_image_folder(self.root, split=self.test_split, classes=self.train.classes)
        image_sizes(self.train, test).check(one_size=USES[self.use].one_size)
        return test

    @cached_property
    def test_idx(self) -> np.ndarray | None:
        return None if self.test is None else subset(len(self.test), self.limit)

    @cached_property
    def stats(self) -> Stats:
        """(mean, std) on the 0..1 scale (`datasets.dataset_stats`: published, or measured and cached)."""
        return dataset_stats(self.stats_of, cache_dir=self.cache_dir)

    def index(self, split: str) -> ImageFolderIndex:
        """The images of `split` ("train" | "test")."""
        return self.train if split == "train" else self.test

    def indices(self, split: str) -> np.ndarray | None:
        """The fixed subset of `split` ("train" | "test") that `limit` keeps (None: all)."""
        return self.train_idx if split == "train" else self.test_idx

    def num(self, split: str) -> int:
        """The images of `split` ("train" | "test") read: its subset's size, else all."""
        idx = self.indices(split)
        return len(self.index(split)) if idx is None else len(idx)


def resolve(spec: str | Path, *, use: str, cache_dir: str | Path | None = None, dataset: str | None = None,
            image_size: int | None = None, limit: int | None = None) -> ResolvedData:
    """The data `spec` (a class-folder tree, an archive, cifar10/cifar100) as a `use` ("pretrain", "eval" or
    "semi", `USES`) run reads it: its splits found, scanned and checked (DataError naming what is wrong);
    the image size `image_size`, else the size rule's (`ImageSizes.default_size`; one_size: the images'
    side); mean/std of `dataset` if given, else of the data; `limit` keeps a fixed subset of each split."""
    if use not in USES:
        raise ValueError(f"use={use!r} is not one of {', '.join(USES)}")
    rules = USES[use]
    root = resolve_data(spec, cache_dir=cache_dir)
    splits = {d.name for d in root.iterdir() if d.is_dir() and d.name in SPLIT_NAMES}
    test_split = next((s for s in TEST_SPLITS if s in splits), None)
    found = ", ".join(sorted(splits)) or "neither"
    if "train" not in splits and (splits or rules.test_required):
        raise DataError(rules.no_train.format(root=root, found=found))
    if test_split is None and rules.test_required:
        raise DataError(rules.no_test.format(root=root, found=found))
    train = scan_image_folder(root, split="train" if splits else None)
    sizes = image_sizes(train)
    if not rules.test_required:
        sizes.check()
    size = image_size or (max(sizes.shape) if rules.one_size else sizes.default_size)
    known = str(spec).lower() if rules.name_stats and str(spec).lower() in TORCHVISION_SETS else None
    data = ResolvedData(root=root, train=train, test_split=test_split, sizes=sizes, size=size,
                        small=sizes.small and size <= SMALL_SIDE, limit=limit, train_idx=subset(len(train), limit),
                        use=use, stats_of=dataset or known or root, cache_dir=cache_dir)
    if rules.test_required:
        _ = data.test  # scanned and checked with the training images now, before anything is built
    return data
