"""Sharding and reshuffling: each sample once per epoch across ranks, reproducible from the seed."""

from __future__ import annotations

import numpy as np
import pytest
from fastse.pipelines.sampler import epoch_indices, rank_seed


def shards(n, world_size, batch_size, *, epoch=0, seed=0, drop_last=True):
    kw = dict(epoch=epoch, seed=seed, world_size=world_size, batch_size=batch_size, drop_last=drop_last)
    return [epoch_indices(n, rank=r, **kw) for r in range(world_size)]


@pytest.mark.parametrize("n,world_size,batch_size", [(1000, 4, 16), (1003, 3, 7), (64, 1, 64), (50_000, 8, 256)])
def test_shards_disjoint_equal_and_drop_only_the_ragged_end(n, world_size, batch_size):
    parts = shards(n, world_size, batch_size)
    kept = n - n % (world_size * batch_size)
    assert {len(p) for p in parts} == {kept // world_size}
    assert all(p.dtype == np.int64 for p in parts)
    union = np.concatenate(parts)
    assert len(np.unique(union)) == kept  # disjoint
    assert union.min() >= 0 and union.max() < n


def test_shards_cover_the_set_without_drop_last():
    n, world_size, batch_size = 1003, 4, 16
    parts = shards(n, world_size, batch_size, drop_last=False)
    assert {len(p) for p in parts} == {1024 // world_size}  # padded up to the next 64
    union = np.concatenate(parts)
    assert set(union.tolist()) == set(range(n))  # covers every sample
    counts = np.bincount(union, minlength=n)
    assert counts.max() == 2 and (counts == 2).sum() == 1024 - n  # only the wrap-around repeats


def test_dropped_samples_change_with_the_epoch_and_each_is_seen_over_epochs():
    n, ws, bs = 1000, 2, 64  # 1000 % 128 = 104 dropped per epoch
    seen = set()
    for epoch in range(6):
        seen |= set(np.concatenate(shards(n, ws, bs, epoch=epoch)).tolist())
    assert seen == set(range(n))


def test_strided_shards_interleave_a_global_permutation():
    n, ws, bs = 640, 4, 8
    parts = shards(n, ws, bs, epoch=3, seed=5)
    perm = np.random.default_rng([5, 3]).permutation(n)
    for r, p in enumerate(parts):
        np.testing.assert_array_equal(p, perm[r::ws])


def test_same_seed_same_order_new_epoch_or_seed_new_order():
    a = epoch_indices(5000, epoch=2, seed=7, rank=1, world_size=2, batch_size=32)
    b = epoch_indices(5000, epoch=2, seed=7, rank=1, world_size=2, batch_size=32)
    np.testing.assert_array_equal(a, b)
    c = epoch_indices(5000, epoch=3, seed=7, rank=1, world_size=2, batch_size=32)
    d = epoch_indices(5000, epoch=2, seed=8, rank=1, world_size=2, batch_size=32)
    assert (a != c).mean() > 0.9 and (a != d).mean() > 0.9


def test_whole_set_reshuffled_not_a_local_buffer():
    # A 1024-sample shuffle buffer keeps sample i within ~1024 positions of i; a full permutation does not.
    p = epoch_indices(50_000, epoch=0, seed=0, batch_size=1)
    assert np.abs(p[:1000] - np.arange(1000)).max() > 40_000


def test_bad_arguments_fail_with_a_reason():
    with pytest.raises(ValueError, match="rank"):
        epoch_indices(10, epoch=0, seed=0, rank=2, world_size=2, batch_size=1)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        epoch_indices(10, epoch=0, seed=0, rank=0, world_size=2, batch_size=8)
    with pytest.raises(ValueError, match="n=0"):
        epoch_indices(0, epoch=0, seed=0)
    assert len(epoch_indices(10, epoch=0, seed=0, world_size=2, batch_size=8, drop_last=False)) == 8


def test_rank_seed_distinct_reproducible_63_bit():
    seeds = {rank_seed(s, r, e) for s in range(4) for r in range(8) for e in range(8)}
    assert len(seeds) == 4 * 8 * 8
    assert all(0 <= x < 2**63 for x in seeds)
    assert rank_seed(3, 1, 2) == rank_seed(3, 1, 2)
    assert rank_seed(0, 1, 0) != rank_seed(0, 0, 1)  # not a symmetric mix of rank and epoch
