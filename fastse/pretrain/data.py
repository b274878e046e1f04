"""Pretraining's data: the two-view training loader of this rank and rank 0's kNN monitor loaders, from what
`pipelines.resolve` decides (the data, its splits, the size rule's size, mean/std, the --limit subsets)."""

from __future__ import annotations

import torch

from fastse import distributed as ddp
from fastse.engine import runs
from fastse.pretrain.config import PretrainConfig

__all__ = ["build_data"]


def build_data(config: PretrainConfig, env: ddp.Dist, dtype: torch.dtype):
    """(train loader of this rank, rank 0's kNN loaders ((loader, n), (loader, n)) or None, a summary, the
    training images' `runs.data_record`). The data, its splits, the size rule's size, mean/std and the --limit
    subsets are `pipelines.resolve`'s; the test split is scanned only where the kNN monitor reads it (rank 0)."""
    from fastse.pipelines.datasets import DataError
    from fastse.pipelines.loader import build_loader
    from fastse.pipelines.recipes import get_recipe
    from fastse.pipelines.resolve import resolve

    data = resolve(config.data_spec, use="pretrain", cache_dir=config.cache_dir, dataset=config.dataset,
                   image_size=config.image_size, limit=config.limit)
    train, size, sizes, stats = data.train, data.size, data.sizes, data.stats
    common = dict(device=env.device, backend=config.loader, dtype=dtype, channels_last=config.channels_last,
                  cache_dir=config.cache_dir)
    n_train = data.num("train")
    if n_train < config.batch_size:
        limited = f" (limit={config.limit})" if data.train_idx is not None else ""
        raise DataError(f"batch_size={config.batch_size} is more than the {n_train} training images{limited} of "
                        f"{train.root}")
    loader = build_loader(get_recipe(config.augmentation or config.method, size).with_stats(*stats), train,
                          batch_size=config.batch_size // env.world_size, seed=config.seed, rank=env.rank,
                          world_size=env.world_size, indices=data.train_idx, drop_last=True, **common)
    summary = f"{n_train} images of {data.root} at {size} px ({sizes.verdict}), {type(loader).__name__}"
    record = {**runs.data_record(train), "classes": len(train.classes)}  # classes: the online probe's outputs
    evals = None
    if env.is_main and data.test_split is not None:
        _ = data.test  # scanned and checked with the training images here, before any kNN loader
        recipe = get_recipe("eval", sizes.default_size if sizes.small else size).with_stats(*stats)
        evals = []
        for split in ("train", "test"):
            n = data.num(split)
            evals.append((build_loader(recipe, data.index(split), batch_size=min(512, n), seed=0,
                                       indices=data.indices(split), drop_last=False, **common), n))
        summary += f"; kNN monitor on {evals[1][1]} {data.test_split} images"
    elif env.is_main:
        summary += "; no test/ or val/ split: no kNN monitor"
    return loader, evals, summary, record


