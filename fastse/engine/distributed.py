"""Processes launched by torchrun (one per GPU, one or several nodes): set-up and the few collectives.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a plain `python` launch
has none of them and runs as a single process, where every helper here is a no-op.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class Dist:
    """This process's place: global `rank` of `world_size`, `local_rank` on its node, its `device`."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> Dist:
    """Join the torchrun process group (nccl on CUDA, gloo on CPU) and pick this process's device
    (`auto`: cuda:LOCAL_RANK when CUDA is present, else cpu). Without torchrun: rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}, but CUDA is not available")
        dev = torch.device("cuda", local if dev.index is None or world > 1 else dev.index)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        # 30 min collective timeout: the other ranks wait at a barrier while rank 0 alone runs the kNN monitor
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method="env://", rank=rank,
                                world_size=world, device_id=dev if dev.type == "cuda" else None,
                                timeout=datetime.timedelta(minutes=30))
    return Dist(rank, world, local, dev)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
def check_same_across_ranks(module: nn.Module, what: str = "teacher") -> None:
    """Raise RanksDiverged on every rank if `module`'s parameters differ between ranks.

    Compares a float64 checksum (the sum, and a position-weighted sum, of each tensor's sums): one
    small all-gather, no copies of the parameters. The released SE code drew its masks from each
    process's unseeded host RNG, so its ranks' teachers drifted apart silently; this makes that loud."""
    if world_size() == 1:
        return
    sums = torch.stack([p.sum(dtype=torch.float64) for p in module.parameters()])
    weights = torch.arange(1, len(sums) + 1, dtype=torch.float64, device=sums.device)
    local = torch.stack([sums.sum(), (sums * weights).sum()])
    everyone = all_gather_cat(local[None])  # [world, 2]
    if not bool((everyone == everyone[:1]).all()):
        rows = ", ".join(f"rank {r}: {a:.17g}/{b:.17g}" for r, (a, b) in enumerate(everyone.tolist()))
        raise RanksDiverged(f"the {what} differs between ranks (checksums {rows})")
