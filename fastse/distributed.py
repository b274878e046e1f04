"""The ranks of a run and the few collectives every layer uses (methods, evaluation, the engine).

Where this process stands (`Dist`, `rank`, `world_size`) and the collectives over the default process
group: gathering, broadcasting, averaging, and checking that copies every rank must hold identically
(the teacher) agree. Without a process group (a plain `python` launch: one process) every helper here
is a no-op. Joining the group under torchrun, choosing the device and failing together are the
engine's (`fastse.engine.launch`). Imports only torch and the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class Dist:
    """This process's place: global `rank` of `world_size`, `local_rank` of the `local_world_size`
    processes on its node, its `device`."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_initialized() -> bool:
    """Whether this process is in a (default) process group."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


@torch.no_grad()
def all_gather_cat(t: Tensor) -> Tensor:
    """The tensors `t` [B, ...] of every rank concatenated in rank order: [world_size * B, ...]
    (no gradient). One process: `t` itself."""
    world = world_size()
    if world == 1:
        return t
    t = t.contiguous()
    out = torch.empty((world * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    if dist.get_backend() == "nccl":
        dist.all_gather_into_tensor(out, t)
    else:
        dist.all_gather(list(out.chunk(world)), t)
    return out


def broadcast_(t: Tensor, src: int = 0) -> Tensor:
    """`t` overwritten in place with rank `src`'s values."""
    if world_size() > 1:
        dist.broadcast(t, src)
    return t


@torch.no_grad()
def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Every buffer of `module` (e.g. a teacher's BN running statistics, which each rank accumulates
    from its own batches) set to rank `src`'s, as DDP does for the student before each forward."""
    if world_size() > 1:
        for b in module.buffers():
            dist.broadcast(b, src)


def all_reduce_mean(t: Tensor) -> Tensor:
    """The mean of `t` over the ranks (a new tensor)."""
    if world_size() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / world_size()


class RanksDiverged(RuntimeError):
    """Copies that every rank must hold identically (the teacher) differ between ranks."""


@torch.no_grad()
def check_same_across_ranks(module: nn.Module, what: str = "teacher", *, exact: bool = False
                            ) -> tuple[float, float] | None:
    """Raise RanksDiverged on every rank if `module`'s parameters differ between ranks; return the
    checksum all ranks share (None on one process).

    The checksum is a float64 pair (the sum, and a position-weighted sum, of each tensor's sums): one
    small all-gather, no copies of the parameters. `exact` also compares every parameter byte with
    rank 0's (one broadcast of all of them: for a final check, not every step). The released SE code
    drew its masks from each process's unseeded host RNG, so its ranks' teachers drifted apart
    silently; this makes that loud."""
    if world_size() == 1:
        return None
    params = [p.detach() for p in module.parameters()]
    sums = torch.stack([p.sum(dtype=torch.float64) for p in params])
    weights = torch.arange(1, len(sums) + 1, dtype=torch.float64, device=sums.device)
    local = torch.stack([sums.sum(), (sums * weights).sum()])
    everyone = all_gather_cat(local[None])  # [world, 2]
    if not bool((everyone == everyone[:1]).all()):
        rows = ", ".join(f"rank {r}: {a:.17g}/{b:.17g}" for r, (a, b) in enumerate(everyone.tolist()))
        raise RanksDiverged(f"the {what} differs between ranks (checksums {rows})")
    if exact:
        mine = torch.cat([p.contiguous().view(-1).view(torch.uint8) for p in params])
        same = torch.equal(mine, broadcast_(mine.clone()))
        agree = all_gather_cat(torch.tensor([int(same)], device=mine.device))
        if not bool(agree.all()):
            bad = [r for r, ok in enumerate(agree.tolist()) if not ok]
            raise RanksDiverged(f"the {what} of rank(s) {bad} differs bitwise from rank 0's (equal checksums)")
    a, b = everyone[0].tolist()
    return a, b
