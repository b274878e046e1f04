"""FixMatch's data on the training device: the labeled split, the labeled (weak view) and unlabeled (weak +
strong views) streams, and the test set.

The training images are decoded once into a uint8 array on the device that both streams share (the
tensor backend of `fastse.pipelines`). The unlabeled stream reads all training images, as FixMatch does;
the labeled one reads the split repeated to about as many images as an unlabeled epoch takes, so both
reshuffle every few hundred steps. Each stream has its own seed and its own epochs; a step's batches
depend only on (seed, step, rank), so a resumed run draws exactly what the uninterrupted one drew.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fastse.distributed import Dist
from fastse.pipelines.datasets import DataError, ImageFolderIndex, labeled_split, load_split, load_uint8
from fastse.pipelines.recipes import fixmatch
from fastse.pipelines.resolve import resolve
from fastse.pipelines.tensor_backend import TensorLoader, normalize
from fastse.semi.config import SemiConfig

EVAL_BATCH = 1024  # test images per forward

Batch = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]  # labeled, labels, weak, strong, unlabeled labels


@dataclass
class SemiData:
    """This rank's streams and test shard. test_images: normalized [P, 3, H, W] (P a multiple of
    `eval_batch`), test_labels [P] with -1 on padding; split: the labeled indices into `train`."""

    train: ImageFolderIndex
    split: np.ndarray
    labeled: TensorLoader
    unlabeled: TensorLoader
    test_images: Tensor
    test_labels: Tensor
    n_test: int
    eval_batch: int
    summary: str

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)

    def batches(self, step: int = 0, *, prefetch: bool = True) -> Iterator[Batch]:
        """Endless batches of this rank from global step `step` on: (labeled [b, 3, H, W], labels [b], weak
        and strong views [mu b, 3, H, W], their true labels [mu b]). On CUDA with `prefetch`, the next
        batch is augmented on a side stream while the current step runs."""
        pairs = zip(_stream(self.labeled, step), _stream(self.unlabeled, step))
        batches = ((xl, yl, uw, us, yu) for ((xl,), yl), ((uw, us), yu) in pairs)
        if prefetch and self.labeled.device.type == "cuda":
            return _ahead_on_side_stream(batches, self.labeled.device)
        return batches


def build_data(config: SemiConfig, env: Dist, dtype: torch.dtype, *, saved_split: Path | None = None) -> SemiData:
    """Scan and check the data, pick the labeled split (or read `saved_split`, a resumed run's), and hold
    this rank's loaders and test shard on `env.device` (images in `dtype`)."""
    # train/ and test/ (or val/), checked together by the size rule: held in memory, of one size (`pipelines.resolve`)
    data = resolve(config.data_spec, use="semi", cache_dir=config.cache_dir, dataset=config.dataset)
    train, test, test_split = data.train, data.test, data.test_split
    side, width = data.sizes.shape
    if side != width:
        raise DataError(f"{data.root}: fastse semi needs square images (they are {side}x{width} px)")
    if len(train) < config.unlabeled_batch:
        raise DataError(f"labeled_batch={config.labeled_batch} x mu={config.mu} unlabeled images a step, but "
                        f"{train.root} has only {len(train)} images")
    split = load_split(saved_split, train.files) if saved_split else choose_labeled(train, config)

    mean, std = data.stats
    strong = fixmatch(data.size).with_stats(mean, std)
    weak = dataclasses.replace(strong, name="fixmatch-weak", views=strong.views[:1])
    images, labels = (torch.from_numpy(a) for a in load_uint8(train, cache_dir=config.cache_dir))
    images, labels = images.permute(0, 3, 1, 2).contiguous().to(env.device), labels.to(env.device)
    repeats = -(-max(config.labeled_batch, len(train) // config.mu) // len(split))
    world = env.world_size
    common = dict(rank=env.rank, world_size=world, dtype=dtype, channels_last=config.channels_last, drop_last=True)
    labeled = TensorLoader(images, labels, weak, batch_size=config.labeled_batch // world,
                           indices=np.tile(split, repeats), seed=_labeled_seed(config.seed), **common)
    unlabeled = TensorLoader(images, labels, strong, batch_size=config.unlabeled_batch // world, seed=config.seed,
                             **common)

    per_rank = -(-len(test) // world)
    eval_batch = min(EVAL_BATCH, per_rank)
    per_rank = -(-per_rank // eval_batch) * eval_batch
    rows = torch.arange(env.rank * per_rank, (env.rank + 1) * per_rank)
    test_u8, test_y = (torch.from_numpy(a)[rows.clamp_max(len(test) - 1)]
                       for a in load_uint8(test, cache_dir=config.cache_dir))
    test_images = normalize(test_u8.permute(0, 3, 1, 2).to(env.device), mean, std, dtype, config.channels_last)
    test_labels = torch.where(rows < len(test), test_y, -1).to(env.device)
    summary = (f"{len(train)} training images ({len(split)} labeled) and {len(test)} {test_split} images of "
               f"{train.root.parent} in {len(train.classes)} classes at {side} px")
    return SemiData(train, split, labeled, unlabeled, test_images, test_labels, len(test), eval_batch, summary)


def choose_labeled(train: ImageFolderIndex, config: SemiConfig) -> np.ndarray:
    """`config.num_labels` indices into `train`, as many of each class, drawn by the split seed."""
    k, n = len(train.classes), config.num_labels
    counts = np.bincount(train.labels, minlength=k)
    if n > len(train):
        raise DataError(f"num_labels={n} is more than the {len(train)} training images of {train.root}")
    if n % k:
        raise DataError(f"num_labels={n} must be a multiple of the {k} classes of {train.root}")
    if n // k > counts.min():
        raise DataError(f"num_labels={n} takes {n // k} images of each class, but class "
                        f"{train.classes[counts.argmin()]!r} of {train.root} has {counts.min()}")
    return labeled_split(train.labels, n, config.seed if config.split_seed is None else config.split_seed)


def _labeled_seed(seed: int) -> int:
    """The labeled stream's seed: another stream than the unlabeled one's (which uses `seed`)."""
    return int(np.random.SeedSequence([seed, 1]).generate_state(1, np.uint64)[0] >> 1)


def _stream(loader: TensorLoader, start: int) -> Iterator[tuple[tuple[Tensor, ...], Tensor]]:
    """`loader`'s batches epoch after epoch from its `start`-th batch (the loader starts mid-epoch where
    the uninterrupted run was: its random streams are where that run had them)."""
    epoch, skip = divmod(start, len(loader))
    while True:
        loader.set_epoch(epoch, start_batch=skip)
        yield from loader
        epoch, skip = epoch + 1, 0


def _ahead_on_side_stream(batches: Iterator[Batch], device: torch.device) -> Iterator[Batch]:
    """`batches`, each drawn on a side CUDA stream one step ahead of its use."""
    side, main = torch.cuda.Stream(device), torch.cuda.current_stream(device)
    side.wait_stream(main)  # the image array and labels were written on the main stream

    def draw() -> Batch:
        with torch.cuda.stream(side):
            return next(batches)

    ahead = draw()
    while True:
        main.wait_stream(side)
        for t in ahead:
            t.record_stream(main)  # the allocator must not hand these to the side stream while main reads them
        batch, ahead = ahead, draw()
        yield batch
