"""Linear evaluation: a classifier trained on a frozen backbone's features, the measure of pretraining.

Protocols (`PROTOCOLS`, `get_protocol`):
- "byol": BatchNorm1d (no affine) + Linear head, SGD lr 0.2 per 256 images, no weight decay, cosine
  per step, 80 epochs on RandomResizedCrop + flip, tested on a resize + centre crop (BYOL's released
  code). At <= 64 px (CIFAR): 100 epochs on flip + 4 px translated crops, tested on the images.
- "moco": a Linear head, lr 30 per 256 images, 100 epochs, lr x 0.1 at 60 % and 80 % of training.
- "fast": the backbone runs once over the train split (its test view, plus `copies` augmented copies
  through the training recipe); the head is then trained on those device-resident features in large
  batches: seconds instead of hours, a few points below the standard protocols.
The backbone stays in eval mode without gradients (its BatchNorm statistics are never updated).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastse import distributed as ddp
from fastse.engine.amp import autocast
from fastse.engine.optim import lr_at, set_lr
from fastse.pipelines.datasets import ImageFolderIndex
from fastse.pipelines.loader import consumer_stream
from fastse.pipelines.recipes import Op, Recipe, View, get_recipe
from fastse.pipelines.resolve import resolve
from fastse.settings import require_finite


@dataclass(frozen=True)
class Protocol:
    """How the linear head is trained. `lr` is per 256 images (scaled by batch_size / 256);
    `milestones` are fractions of training where a "step" schedule multiplies lr by 0.1."""

    name: str
    epochs: int
    batch_size: int
    lr: float
    schedule: str = "cosine"           # cosine (per step, to 0) | step
    milestones: tuple[float, ...] = ()
    weight_decay: float = 0.0
    momentum: float = 0.9              # SGD
    batchnorm: bool = True             # BatchNorm1d (no affine) before the Linear layer
    precomputed: bool = False          # features extracted once (the fast protocol)
    copies: int = 0                    # precomputed: augmented copies of the train split

    @property
    def scaled_lr(self) -> float:
        return self.lr * self.batch_size / 256

    def lr_of(self, step: int, total: int) -> float:
        """Learning rate of step `step` (0-based) of `total`."""
        if self.schedule == "cosine":
            return lr_at(step, total, self.scaled_lr)
        return self.scaled_lr * 0.1 ** sum(step >= m * total for m in self.milestones)

    def validate(self) -> Protocol:
        require_finite(self)
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.weight_decay < 0 or self.copies < 0:
            raise ValueError("weight_decay and copies must be >= 0")
        if self.copies and not self.precomputed:
            raise ValueError(f"copies={self.copies}: augmented feature copies belong to the fast protocol")
        if self.schedule not in ("cosine", "step"):
            raise ValueError(f"schedule={self.schedule!r} is not one of cosine, step")
        return self


PROTOCOLS: dict[str, Protocol] = {
    "byol": Protocol("byol", epochs=80, batch_size=256, lr=0.2),
    "moco": Protocol("moco", epochs=100, batch_size=256, lr=30.0, schedule="step", milestones=(0.6, 0.8),
                     batchnorm=False),
    "fast": Protocol("fast", epochs=100, batch_size=1024, lr=0.1, precomputed=True),
}
_SMALL = {"byol": {"epochs": 100}}  # CIFAR at 32 px


def get_protocol(name: str, *, small: bool = False, **overrides: Any) -> Protocol:
    """The protocol `name` (its small-image variant if `small`), with `overrides` that are not None."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    changes = {**(_SMALL.get(name, {}) if small else {}), **{k: v for k, v in overrides.items() if v is not None}}
    return dataclasses.replace(PROTOCOLS[name], **changes).validate()


# ------------------------------------------------------------------------------------------- data


@dataclass
class EvalData:
    """The train and test splits of a class-folder tree, at `size` px, normalised by `stats`;
    `*_idx` restrict them to fixed subsets (None: all)."""

    train: ImageFolderIndex
    test: ImageFolderIndex
    size: int
    small: bool
    stats: tuple[tuple[float, float, float], tuple[float, float, float]]
    train_idx: np.ndarray | None = None
    test_idx: np.ndarray | None = None
    cache_dir: str | None = None

    def num(self, split: str) -> int:
        index, idx = (self.train, self.train_idx) if split == "train" else (self.test, self.test_idx)
        return len(index) if idx is None else len(idx)

    def recipe(self, kind: str) -> Recipe:
        """"train": RandomResizedCrop + flip (small images: flip + translated crop); "test": the eval view."""
        if kind == "test":
            return get_recipe("eval", self.size).with_stats(*self.stats)
        if self.small:
            ops = (Op("hflip", p=0.5), Op("translate", params={"size": self.size, "pad_frac": 0.125,
                                                                 "padding": "reflect"}))
            return Recipe("linear-small", (View(ops),), self.size, *self.stats)
        return get_recipe("linear", self.size).with_stats(*self.stats)

    def loader(self, split: str, kind: str, *, batch_size: int, device: str | torch.device, backend: str = "auto",
               seed: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = False):
        """A `build_loader` loader over `split` ("train" | "test") with the `kind` recipe (this rank's
        shard); channels_last batches on CUDA."""
        from fastse.pipelines.loader import build_loader

        index, idx = (self.train, self.train_idx) if split == "train" else (self.test, self.test_idx)
        return build_loader(self.recipe(kind), index, batch_size=min(batch_size, self.num(split)), device=device,
                            backend=backend, seed=seed, rank=rank, world_size=world_size, indices=idx,
                            drop_last=drop_last, channels_last=torch.device(device).type == "cuda",
                            cache_dir=self.cache_dir)


def eval_data(data: str | Path, *, dataset: str | None = None, limit: int | None = None,
              image_size: int | None = None, cache_dir: str | None = None) -> EvalData:
    """The train and test (or val) splits of `data` (a class-folder tree, an archive, cifar10/cifar100);
    mean/std of `dataset` if given, else of the data; `limit` keeps a fixed subset of each split
    (`pipelines.resolve` decides, as for pretraining and FixMatch)."""
    r = resolve(data, use="eval", cache_dir=cache_dir, dataset=dataset, image_size=image_size, limit=limit)
    return EvalData(r.train, r.test, r.size, r.small, r.stats, r.train_idx, r.test_idx, cache_dir)


# -------------------------------------------------------------------------------------- training


@torch.no_grad()
def features(backbone: nn.Module, batches: Iterable, *, device: torch.device, num: int | None = None
             ) -> tuple[Tensor, Tensor]:
    """(features float32 [N, D], labels int64 [N]) on `device`, not normalised; `num` cuts a
    wrapping loader's padding. The backbone must be in eval mode."""
    feats, labels = [], []
    for x, y in batches:
        x = x[0] if isinstance(x, (tuple, list)) else x
        with autocast(device):
            feats.append(backbone(x.to(device, non_blocking=True)).float().flatten(1))
        labels.append(torch.as_tensor(y).to(device, torch.int64))
    return torch.cat(feats)[:num], torch.cat(labels)[:num]


def make_head(dim: int, num_classes: int, *, batchnorm: bool) -> nn.Module:
    """Linear(dim -> num_classes), weights N(0, 0.01), zero bias; after BatchNorm1d (no affine) if asked."""
    linear = nn.Linear(dim, num_classes)
    nn.init.normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False), linear) if batchnorm else linear


def train_head(head: nn.Module, batches: Callable[[int], Iterable[tuple[Tensor, Tensor]]], steps_per_epoch: int,
               protocol: Protocol, *, on_epoch: Callable[[int, float], None] | None = None) -> None:
    """Train `head` by SGD with cross-entropy on `batches(epoch)` -> (features [B, D], labels [B]);
    `on_epoch(epoch, mean loss)` after each epoch (the only host sync)."""
    head.train()
    opt = torch.optim.SGD(head.parameters(), lr=protocol.scaled_lr, momentum=protocol.momentum,
                          weight_decay=protocol.weight_decay)
    total, step = protocol.epochs * steps_per_epoch, 0
    for epoch in range(protocol.epochs):
        loss_sum, n = None, 0
        for x, y in batches(epoch):
            set_lr(opt, protocol.lr_of(step, total))
            loss = F.cross_entropy(head(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            step, n = step + 1, n + 1
        if on_epoch is not None and n:
            on_epoch(epoch + 1, float(ddp.all_reduce_mean(loss_sum / n)))


_GRAPH_WARMUP = 3  # eager steps before the step is captured as a CUDA graph


@torch.no_grad()
def train_head_on_features(head: nn.Module, feats: Tensor, labels: Tensor, protocol: Protocol, *, seed: int = 0,
                           on_epoch: Callable[[int, float], None] | None = None) -> None:
    """The fast protocol's loop: `train_head`'s SGD (momentum, weight decay, the protocol's lr per
    step, BatchNorm1d batch statistics) on device-resident features [N, D] float32 and labels [N],
    written out by hand so that one step is a fixed sequence of kernels on static buffers. On CUDA
    that step is captured once as a CUDA graph and replayed: a step costs one launch instead of ~30
    (the head is tiny; Python and launches were the whole cost). Batches: a fresh permutation each
    epoch from a generator seeded with `seed`, the ragged end dropped. `on_epoch(epoch, mean loss)`."""
    device, n, bs = feats.device, len(feats), protocol.batch_size
    steps, total = n // bs, protocol.epochs * (n // bs)
    if steps < 1:
        raise ValueError(f"batch_size={bs} is larger than the {n} train features")
    head.train()
    bn = next((m for m in head.modules() if isinstance(m, nn.BatchNorm1d)), None)
    linear = next(m for m in head.modules() if isinstance(m, nn.Linear))
    if bn is not None and bn.affine:
        raise ValueError("train_head_on_features: the BatchNorm1d of the head must have no affine parameters")
    w, b = linear.weight, linear.bias
    w_buf, b_buf = torch.zeros_like(w), torch.zeros_like(b)
    lrs = torch.tensor([protocol.lr_of(k, total) for k in range(total)], dtype=torch.float32, device=device)
    order = torch.empty(steps * bs, dtype=torch.int64, device=device)
    at, step = (torch.zeros(1, dtype=torch.int64, device=device) for _ in range(2))  # device counters: no syncs
    offsets = torch.arange(bs, device=device)
    minus_one = torch.full((bs, 1), -1.0, device=device)
    loss_sum = torch.zeros((), device=device)
    m, wd = protocol.momentum, protocol.weight_decay

    def sgd_step() -> None:
        idx = order.index_select(0, at + offsets)
        x, y = feats.index_select(0, idx), labels.index_select(0, idx)
        if bn is not None:  # BatchNorm1d(affine=False) in train mode, running statistics included
            mean, var = x.mean(0), x.var(0, unbiased=False)
            x = (x - mean) * torch.rsqrt(var + bn.eps)
            bn.running_mean.lerp_(mean, bn.momentum)
            bn.running_var.lerp_(var * (bs / (bs - 1)), bn.momentum)
            bn.num_batches_tracked.add_(1)
        z = torch.addmm(b, x, w.t())
        loss_sum.add_((z.logsumexp(1) - z.gather(1, y[:, None]).squeeze(1)).mean())
        g = z.softmax(1).scatter_add_(1, y[:, None], minus_one).div_(bs)  # d mean-CE / d logits
        lr = lrs.index_select(0, step)  # [1]
        for p, grad, buf in ((w, g.t() @ x, w_buf), (b, g.sum(0), b_buf)):
            if wd:
                grad = grad.add(p, alpha=wd)
            buf.mul_(m).add_(grad)  # torch.optim.SGD: the first step's buffer is the gradient itself
            p.sub_(buf * lr)
        at.add_(bs)
        step.add_(1)

    graph, stream = None, torch.cuda.Stream(device) if device.type == "cuda" else None
    gen, done = torch.Generator(device).manual_seed(seed), 0
    for epoch in range(protocol.epochs):
        order.copy_(torch.randperm(n, device=device, generator=gen)[: steps * bs])
        at.zero_()
        loss_sum.zero_()
        for _ in range(steps):
            if graph is not None:
                graph.replay()
            elif stream is not None and done >= _GRAPH_WARMUP:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream):
                    sgd_step()
                graph.replay()
            elif stream is not None:  # warm-up steps on a side stream, as graph capture wants
                stream.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(stream):
                    sgd_step()
                torch.cuda.current_stream(device).wait_stream(stream)
            else:
                sgd_step()
            done += 1
        if on_epoch is not None:
            on_epoch(epoch + 1, float(loss_sum) / steps)


@torch.no_grad()
def accuracy(head: nn.Module, feats: Tensor, labels: Tensor, *, chunk: int = 4096) -> dict[str, float]:
    """{"top1", "top5"} of `head` on features [N, D] in percent (top5 is 100 with < 5 classes)."""
    head.eval()
    hits = []
    for f, y in zip(feats.split(chunk), labels.split(chunk)):
        logits = head(f)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits.append(top == y[:, None])
    hit = torch.cat(hits)
    return {"top1": 100.0 * hit[:, 0].float().mean().item(), "top5": 100.0 * hit.any(1).float().mean().item()}


def train_linear(backbone: nn.Module, data: EvalData, protocol: Protocol, *, device: str | torch.device = "cpu",
                 backend: str = "auto", seed: int = 0, on_epoch: Callable[[int, float], None] | None = None,
                 on_head: Callable[[int, nn.Module], None] | None = None) -> nn.Module:
    """A linear head trained on the frozen `backbone`'s features of `data`'s train split by `protocol`;
    `on_epoch(epoch, mean loss)`, then `on_head(epoch, head)` after each epoch.

    Under torchrun (an initialised process group) the standard protocols are data-parallel: each
    rank reads its shard in batches of batch_size / world_size and DDP averages the gradients;
    every rank returns the same head. The fast protocol runs on one process."""
    device, world = torch.device(device), ddp.world_size()
    if protocol.precomputed and world > 1:
        raise ValueError("the fast protocol runs on one process: launch it without torchrun")
    if protocol.batch_size % world:
        raise ValueError(f"batch_size={protocol.batch_size} is not divisible by the {world} processes")
    backbone = _frozen(backbone, device)
    n_train, bs = data.num("train"), protocol.batch_size
    if bs > n_train:
        raise ValueError(f"batch_size={bs} is larger than the {n_train} train images")
    torch.manual_seed(seed)
    head = make_head(_feature_dim(backbone, data, device), len(data.train.classes),
                     batchnorm=protocol.batchnorm).to(device)
    if on_head is not None:
        user_on_epoch = on_epoch

        def on_epoch(epoch: int, loss: float) -> None:
            if user_on_epoch is not None:
                user_on_epoch(epoch, loss)
            on_head(epoch, head)
    if protocol.precomputed:
        parts = [features(backbone, data.loader("train", "test", batch_size=512, device=device, backend=backend),
                          device=device, num=n_train)]
        if protocol.copies:
            aug = data.loader("train", "train", batch_size=512, device=device, backend=backend, seed=seed)
            for k in range(protocol.copies):
                aug.set_epoch(k)
                parts.append(features(backbone, aug, device=device, num=n_train))
        feats, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        train_head_on_features(head, feats, labels, protocol, seed=seed, on_epoch=on_epoch)
        return head

    train_loader = data.loader("train", "train", batch_size=bs // world, device=device, backend=backend,
                               seed=seed, rank=ddp.rank(), world_size=world, drop_last=True)
    steps = len(train_loader)

    def batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        train_loader.set_epoch(epoch)
        return frozen_features(backbone, train_loader, device)

    trained = head
    if world > 1:  # BatchNorm statistics: DDP broadcasts rank 0's with every forward
        trained = torch.nn.parallel.DistributedDataParallel(head, device_ids=[device.index] if device.index is not
                                                            None else None)
    with consumer_stream(train_loader, device):  # DALI's work fills the gaps of the step
        train_head(trained, batches, steps, protocol, on_epoch=on_epoch)
    ddp.broadcast_buffers(head)  # the last forward updated each rank's BatchNorm statistics on its own shard
    return head


def linear_eval(backbone: nn.Module, data: EvalData, protocol: Protocol, *, device: str | torch.device = "cpu",
                backend: str = "auto", seed: int = 0, on_epoch: Callable[[int, float], None] | None = None,
                test_every: int = 0, on_test: Callable[[int, dict[str, float]], None] | None = None
                ) -> dict[str, Any]:
    """`train_linear`, then the head's accuracy on `data`'s test split (on every rank): {"top1",
    "top5" (%), "protocol", "epochs", "batch_size", "lr" (peak), "copies", "train_images",
    "test_images", "feature_dim", "seconds"}. With `test_every` > 0, also `on_test(epoch, {"top1",
    "top5"})` every `test_every` epochs and at the last (the test features are extracted first, once)."""
    started = time.perf_counter()
    device = torch.device(device)
    n_test = data.num("test")

    def test_features() -> tuple[Tensor, Tensor]:
        loader = data.loader("test", "test", batch_size=min(512, n_test), device=device, backend=backend)
        return features(_frozen(backbone, device), loader, device=device, num=n_test)

    test, on_head = None, None
    if test_every > 0 and on_test is not None:
        test = test_features()

        def on_head(epoch: int, head: nn.Module) -> None:
            if epoch % test_every == 0 or epoch == protocol.epochs:
                training = head.training
                on_test(epoch, accuracy(head, *test))
                head.train(training)

    head = train_linear(backbone, data, protocol, device=device, backend=backend, seed=seed, on_epoch=on_epoch,
                        on_head=on_head)
    test = test if test is not None else test_features()
    return {**accuracy(head, *test), "protocol": protocol.name, "epochs": protocol.epochs,
            "batch_size": protocol.batch_size, "lr": protocol.scaled_lr, "copies": protocol.copies,
            "train_images": data.num("train"), "test_images": n_test, "feature_dim": int(test[0].shape[1]),
            "seconds": time.perf_counter() - started}


def frozen_features(backbone: nn.Module, batches: Iterable[tuple[tuple[Tensor, ...], Tensor]], device: torch.device
                    ) -> Iterator[tuple[Tensor, Tensor]]:
    """(features float32 [B, D], labels int64 [B]) of the frozen `backbone` (eval mode, no gradients) on
    the first view of each `(views, labels)` batch: what the standard protocols train their head on."""
    for views, y in batches:
        with torch.no_grad(), autocast(device):
            f = backbone(views[0]).float().flatten(1)
        yield f, torch.as_tensor(y).to(device, torch.int64)


def _frozen(backbone: nn.Module, device: torch.device) -> nn.Module:
    backbone = backbone.to(device).eval().requires_grad_(False)
    return backbone.to(memory_format=torch.channels_last) if device.type == "cuda" else backbone


@torch.no_grad()
def _feature_dim(backbone: nn.Module, data: EvalData, device: torch.device) -> int:
    dim = getattr(backbone, "feature_dim", None)
    if dim is None:
        with autocast(device):
            dim = backbone(torch.zeros(2, 3, data.size, data.size, device=device)).flatten(1).shape[1]
    return int(dim)
