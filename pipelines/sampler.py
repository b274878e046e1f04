"""Which samples each rank reads in each epoch, and the seeds of its random streams.

Every rank computes the same global permutation from (seed, epoch) without communication, so the
whole dataset is reshuffled every epoch (not only a shuffle buffer) and the shards never overlap.
"""

from __future__ import annotations

import numpy as np

_MASK63 = (1 << 63) - 1


def epoch_indices(
    n: int,
    *,
    epoch: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 1,
    drop_last: bool = True,
) -> np.ndarray:
    """This rank's sample indices for one epoch, int64 of shape [n_per_rank], in reading order.

    A permutation of range(n) is drawn from (seed, epoch). With `drop_last` its tail is cut to a
    multiple of world_size * batch_size (the same samples are dropped on every rank, and a new
    epoch drops others); without it the permutation is padded by wrapping around to its start up to
    the next such multiple, so a few samples are seen twice. Either way every rank gets the same
    count, a whole number of batches. Shards are strided: rank r reads positions r, r + world_size,
    ... of the permutation, so rank r's k-th batch is part of the k-th global batch.
    """
    if n <= 0:
        raise ValueError(f"epoch_indices: n={n}, need at least one sample")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"epoch_indices: rank={rank} is not in [0, world_size={world_size})")
    if batch_size < 1:
        raise ValueError(f"epoch_indices: batch_size={batch_size} must be >= 1")
    if epoch < 0 or seed < 0:
        raise ValueError(f"epoch_indices: epoch={epoch} and seed={seed} must be >= 0")
    step = world_size * batch_size
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    if drop_last:
        if n < step:
            raise ValueError(
                f"epoch_indices: n={n} samples are fewer than one global batch "
                f"(world_size {world_size} x batch_size {batch_size}); use drop_last=False"
            )
        perm = perm[: n - n % step]
    else:
        total = -(-n // step) * step
        perm = np.resize(perm, total)  # np.resize repeats the array cyclically
    return perm[rank::world_size].astype(np.int64, copy=False)


def rank_seed(seed: int, rank: int, epoch: int) -> int:
    """A 63-bit seed for one rank's augmentation stream in one epoch: distinct per (seed, rank, epoch),
    reproducible, and well mixed (SeedSequence hashing, not seed + rank)."""
    if min(seed, rank, epoch) < 0:
        raise ValueError(f"rank_seed: seed={seed}, rank={rank}, epoch={epoch} must be >= 0")
    words = np.random.SeedSequence([seed, rank, epoch]).generate_state(2, dtype=np.uint32)
    return ((int(words[0]) << 32) | int(words[1])) & _MASK63
