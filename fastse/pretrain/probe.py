"""The online linear probe of pretraining (as solo-learn's and lightly's online classifiers): a linear head
on the teacher's backbone features that the step computes anyway, trained on the labels of the training
batch with its own SGD, measured on the test split at every kNN check.

Why the teacher: it is what fastse exports (`backbone.safetensors`) and what the kNN monitor measures, so
the probe's top-1 sits next to the kNN top-1 of the same network (solo-learn and lightly probe the student;
`--knn-student` compares the two). The features are those of the first view, taken from the teacher's
forward of the step (`Method.want_features`): no extra forward. They are detached and the probe has its
own parameters and optimizer: its gradients never reach the backbone, the student's optimizer never sees
it, and it draws no random numbers (zero initialisation), so teacher and student train exactly as without
it. The features are standardised by a BatchNorm without affine parameters first (as in BYOL's and MAE's
linear evaluation): self-supervised features are large and uncentred (a BYOL ResNet-18's norm ~40 early
on), on which plain SGD diverges at any rate that learns. A step is a handful of device ops (a cast, batch
norm, one matmul forward and backward, cross-entropy, a fused / foreach SGD update) and no host sync.
Under DDP it runs on rank 0 only, on rank 0's share of the batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastse import checkpoints as ckpt

GROUP = "probe"  # its checkpoint group


class OnlineProbe:
    """A linear classifier of standardised features [N, dim] (BatchNorm1d without affine; its running
    statistics at evaluation) into `num_classes` classes, trained with SGD (momentum 0.9, no weight decay)
    at `lr` x the schedule factor given to `step`."""

    def __init__(self, dim: int, num_classes: int, *, lr: float, device: torch.device, momentum: float = 0.9):
        self.dim, self.num_classes, self.lr = dim, num_classes, lr
        self.norm = nn.BatchNorm1d(dim, affine=False, device=device)
        self.linear = nn.Linear(dim, num_classes, device=device)
        with torch.no_grad():  # zero init: a convex problem needs no random start, and draws none
            self.linear.weight.zero_()
            self.linear.bias.zero_()
        fused = True if device.type == "cuda" else None
        self.optimizer = torch.optim.SGD(self.linear.parameters(), lr=lr, momentum=momentum, fused=fused)
        self.loss_sum = torch.zeros((), device=device)  # summed since the last `mean_loss`
        self.steps = 0

    def step(self, features: Tensor, labels: Tensor, lr_factor: float = 1.0) -> None:
        """One SGD step on `features` [N, dim] (detached here) with int64 `labels` [N]; `lr_factor` scales
        `lr` (the backbone's schedule, in [0, 1]). No host sync."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * lr_factor
        with torch.autocast(features.device.type, enabled=False):
            loss = F.cross_entropy(self.linear(self.norm.train()(features.detach().float())), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.loss_sum += loss.detach()
        self.steps += 1

    def mean_loss(self) -> float | None:
        """The mean training loss since the last call (a host sync; None without steps), then reset."""
        if not self.steps:
            return None
        loss = float(self.loss_sum) / self.steps
        self.loss_sum.zero_()
        self.steps = 0
        return loss

    @torch.no_grad()
    def accuracy(self, features: Tensor, labels: Tensor) -> float:
        """Top-1 (%) on `features` [M, dim] (raw, as the training ones) with labels [M]."""
        logits = self.linear(self.norm.eval()(features.float()))
        return 100.0 * float((logits.argmax(1) == labels.to(logits.device)).float().mean())

    # ------------------------------------------------------------------------------ checkpoints

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """(tensors for the checkpoint group `GROUP`, JSON-able metadata)."""
        opt_tensors, layout = ckpt.optimizer_to_tensors(self.optimizer)
        tensors = {f"{name}.{k}": v for name in ("norm", "linear") for k, v in getattr(self, name).state_dict().items()}
        tensors.update({f"optimizer.{k}": v for k, v in opt_tensors.items()})
        return tensors, {"dim": self.dim, "num_classes": self.num_classes, "optimizer_layout": layout}

    def load(self, tensors: dict[str, Tensor] | None, meta: dict[str, Any] | None) -> str | None:
        """Restore what `state` returned; None when restored, else why the probe starts fresh (no saved
        state: a checkpoint written before fastse had a probe or without it; another shape)."""
        if not tensors or not isinstance(meta, dict):
            return "the checkpoint holds no online probe (written without one or before fastse had it)"
        if (meta.get("dim"), meta.get("num_classes")) != (self.dim, self.num_classes):
            return (f"the checkpoint's probe is {meta.get('dim')} -> {meta.get('num_classes')}, this run's "
                    f"{self.dim} -> {self.num_classes}")
        for name in ("norm", "linear"):
            getattr(self, name).load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items()
                                                 if k.startswith(f"{name}.")})
        ckpt.optimizer_from_tensors(self.optimizer, {k[len("optimizer."):]: v for k, v in tensors.items()
                                                     if k.startswith("optimizer.")}, meta["optimizer_layout"])
        return None
