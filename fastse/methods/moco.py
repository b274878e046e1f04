"""MoCo v2 (He et al. 2020; Chen et al. 2020): InfoNCE of queries against a queue of teacher keys.

BatchNorm of the key encoder under DDP. A query and its positive key must not share the batch
statistics they are normalised with, or the network learns to recognise the sub-batch instead of the
image (MoCo, section 3.3). We use MoCo's own remedy, shuffle-BN: each rank encodes a random slice of
the global batch of key images, so the keys of its samples are normalised on other ranks. It costs
one all-gather of the key images per step (3 MB at CIFAR scale) and keeps every collective outside
the teacher's compiled forward, and it is what the MoCo v2 numbers were measured with. SyncBN
(`syncbn=True`, both encoders) also removes the signal, at one collective per BN layer per forward;
then no shuffle is done. On one process neither applies, as in the official code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastse import distributed as ddp
from fastse.methods import Encoder, Method
from fastse.models import moco_head
from fastse.smoothing import make_teacher


class MoCoV2(Method):
    """Student: backbone -> MLP head (feature_dim-hidden-dim, no BN); teacher: its copy, the key
    encoder. A queue [queue_size, dim] of L2-normalised keys, filled with the keys of all ranks."""

    def __init__(self, backbone: nn.Module, *, hidden_dim: int = 2048, dim: int = 128, queue_size: int = 65536,
                 temperature: float = 0.2, syncbn: bool = False):
        super().__init__()
        student = Encoder(backbone, moco_head(backbone.feature_dim, hidden_dim, dim))
        self.student = nn.SyncBatchNorm.convert_sync_batchnorm(student) if syncbn else student
        self.teacher = make_teacher(self.student)
        self.temperature, self.shuffle_bn = temperature, not syncbn
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.int64))  # next row to write

    def forward(self, views: Sequence[Tensor]) -> Tensor:
        """views: (query images, key images) [N, 3, H, W] -> scalar InfoNCE loss; enqueues the keys."""
        xq, xk = views
        q = F.normalize(self.student_fn(xq).float(), dim=1)
        with torch.no_grad():
            k, k_all = self.keys(xk)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ self.queue.clone().t()], dim=1) / self.temperature
        loss = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.int64, device=q.device))
        self.enqueue(k_all)
        return loss

    @torch.no_grad()
    def keys(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(this rank's keys [N, dim], every rank's keys [world x N, dim]), L2-normalised, fp32;
        with shuffle-BN under DDP the teacher encodes a random slice of the global batch."""
        world = ddp.world_size()
        if world == 1 or not self.shuffle_bn:
            k = F.normalize(self._encode_keys(x).float(), dim=1)
            return k, ddp.all_gather_cat(k)
        n, rank = len(x), ddp.rank()
        x_all = ddp.all_gather_cat(x)
        perm = ddp.broadcast_(torch.randperm(len(x_all), device=x.device))  # rank 0's draw, on every rank
        mine = torch.empty_like(x).copy_(x_all[perm[rank * n:(rank + 1) * n]])  # x's memory format (channels_last)
        k = F.normalize(self._encode_keys(mine).float(), dim=1)
        if self.keep_features:
            self.feature_index = perm[rank * n:(rank + 1) * n]
        k_shuffled = ddp.all_gather_cat(k)
        k_all = torch.empty_like(k_shuffled)
        k_all[perm] = k_shuffled  # back to the global batch order
        return k_all[rank * n:(rank + 1) * n], k_all

    def _encode_keys(self, x: Tensor) -> Tensor:
        """The teacher's keys of `x` (unnormalised); with `keep_features`, its backbone features kept too."""
        if not self.keep_features:
            return self.teacher_fn(x)
        k, self.features = self.teacher_fn(x, True)
        return k

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write `keys` [M, dim] at the queue pointer, wrapping around (no host sync)."""
        size = len(self.queue)
        rows = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % size
        self.queue.index_copy_(0, rows, keys.to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % size)

    def smoothing_pairs(self) -> tuple[nn.Module, nn.Module]:
        return self.student, self.teacher
