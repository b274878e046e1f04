"""Optimizers (SGD, LARS) and the learning-rate schedule (linear warmup, then cosine to zero), per step."""

from __future__ import annotations

import math

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017), as BYOL uses it: for groups
    with `lars=True` the update of each tensor is scaled by eta * ||w|| / ||g + wd w||; groups with
    `lars=False` (biases, BatchNorm) get plain SGD. Multi-tensor ops, no host sync."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else torch.enable_grad()(closure)()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            if group["lars"]:
                w, g = torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(grads))
                trust = torch.where((w > 0) & (g > 0), group["eta"] * w / g, torch.ones_like(w))
                grads = torch._foreach_mul(grads, list(trust.unbind()))
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, grads)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return loss


def build_optimizer(model: nn.Module, name: str, *, lr: float, momentum: float, weight_decay: float
                    ) -> torch.optim.Optimizer:
    """SGD over every trainable parameter of `model` (weight decay on all, as the recipes do), or
    LARS with biases and BatchNorm parameters (1-D tensors) excluded from decay and adaptation."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "lars":
        groups = [{"params": [p for p in params if p.ndim > 1]},
                  {"params": [p for p in params if p.ndim <= 1], "lars": False, "weight_decay": 0.0}]
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; known: sgd, lars")


def lr_at(step: int, total_steps: int, peak: float, warmup_steps: int = 0) -> float:
    """Learning rate of step `step` (0-based): linear from peak/warmup to `peak` over `warmup_steps`,
    then cosine to 0 at `total_steps`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
