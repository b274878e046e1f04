"""FixMatch (Sohn et al. 2020) with a smoothed model: the loss, the learning-rate schedule, the optimizer
and the student + teacher module.

Per step: labeled images x with labels y, and unlabeled images u seen as a weak view a(u) and a strong
view A(u). The pseudo-label of u is the argmax of the softmax of the weak view's logits, kept where its
probability is at least `threshold`; the loss is CE(x, y) + lambda_u * mean over u of kept * CE(A(u),
pseudo-label). The student sees labeled, weak and strong images in one forward (one BatchNorm batch,
as FixMatch does). The teacher (the smoothed model: EMA / SE / STS of the student, updated by a
`fastse.smoothing.Smoother`) runs in eval mode only: it is what is evaluated, and with
`teacher_targets` its weak-view logits give the pseudo-labels instead of the student's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastse.methods import Method
from fastse.smoothing import make_teacher

STATS = ("loss", "loss_x", "loss_u", "mask", "correct")  # the entries of fixmatch_loss's stats vector


def fixmatch_loss(logits_x: Tensor, labels: Tensor, logits_weak: Tensor, logits_strong: Tensor, *,
                  threshold: float = 0.95, lambda_u: float = 1.0,
                  unlabeled_labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(loss, stats) of one FixMatch step, computed in float32.

    logits_x [B, C] with `labels` [B]; logits_weak and logits_strong [mu B, C] of the same unlabeled
    images (no gradient flows through the weak ones). stats: float32 [5] in the order of `STATS`:
    the loss, its labeled and unlabeled terms, the fraction of unlabeled images whose pseudo-label is
    kept, and the fraction whose pseudo-label is kept and equals `unlabeled_labels` (monitoring only;
    0 when not given: correct / mask is the accuracy of the kept pseudo-labels)."""
    loss_x = F.cross_entropy(logits_x.float(), labels)
    confidence, pseudo = logits_weak.detach().float().softmax(-1).max(-1)
    mask = (confidence >= threshold).float()
    loss_u = (F.cross_entropy(logits_strong.float(), pseudo, reduction="none") * mask).mean()
    loss = loss_x + lambda_u * loss_u
    correct = mask.new_zeros(()) if unlabeled_labels is None else ((pseudo == unlabeled_labels) * mask).mean()
    return loss, torch.stack([loss.detach(), loss_x.detach(), loss_u.detach(), mask.mean(), correct])


def fixmatch_lr(step: int, total_steps: int, peak: float) -> float:
    """FixMatch's schedule: peak x cos(7 pi k / 16 K) at step k of K (from peak to 0.195 x peak)."""
    return peak * math.cos(7 * math.pi * min(step, total_steps) / (16 * total_steps))


def build_optimizer(model: nn.Module, *, lr: float, momentum: float, weight_decay: float,
                    fused: bool | None = None) -> torch.optim.SGD:
    """SGD with Nesterov momentum; weight decay on conv and linear weights only, not on BatchNorm
    parameters and biases (the 1-D tensors). `fused`: one kernel for the whole update (CUDA)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1]},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True, fused=fused)


class FixMatch(Method):
    """`student` (a classifier: images [N, 3, H, W] -> logits [N, C]) and `teacher`, its smoothed copy
    (always in eval mode). `forward(labeled, labels, weak, strong)` -> (loss, stats) of `fixmatch_loss`."""

    def __init__(self, student: nn.Module, *, threshold: float = 0.95, lambda_u: float = 1.0,
                 teacher_targets: bool = False):
        super().__init__()
        self.student = student
        self.teacher = make_teacher(student).eval()
        self.threshold, self.lambda_u, self.teacher_targets = threshold, lambda_u, teacher_targets

    def wrap(self, *, student=None, teacher=None, loss=None) -> FixMatch:
        """Call `student` / `teacher` / `loss` (DDP- or compile-wrapped versions) in `forward`."""
        super().wrap(student=student, teacher=teacher)
        if loss is not None:
            self._calls["loss"] = loss
        return self

    def train(self, mode: bool = True) -> FixMatch:
        super().train(mode)
        self.teacher.eval()  # its BN statistics come from the student (Smoother buffers='copy' or 'ema')
        return self

    def forward(self, labeled: Tensor, labels: Tensor, weak: Tensor, strong: Tensor,
                unlabeled_labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """labeled [B, 3, H, W] with labels [B]; weak and strong views [mu B, 3, H, W] of the same images
        (their true labels [mu B] optional, for the pseudo-label accuracy)."""
        n, m = len(labeled), len(weak)
        logits_x, logits_weak, logits_strong = self.student_fn(torch.cat([labeled, weak, strong])).split([n, m, m])
        if self.teacher_targets:
            with torch.no_grad():
                logits_weak = self.teacher_fn(weak)
        loss = self._calls.get("loss", fixmatch_loss)
        return loss(logits_x, labels, logits_weak, logits_strong, threshold=self.threshold, lambda_u=self.lambda_u,
                    unlabeled_labels=unlabeled_labels)

    def smoothing_pairs(self) -> tuple[nn.Module, nn.Module]:
        return self.student, self.teacher
