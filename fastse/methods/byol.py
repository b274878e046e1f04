"""BYOL (Grill et al. 2020): the student predicts the teacher's projection of the other view."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastse.methods import Encoder, Method
from fastse.models import byol_predictor, byol_projector
from fastse.smoothing import make_teacher


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """2 - 2 cos(p, z), averaged over the batch: predictions p and targets z [N, D] (computed in fp32)."""
    return 2 - 2 * F.cosine_similarity(p.float(), z.float(), dim=-1).mean()


class Online(nn.Module):
    """The BYOL student: encoder (backbone + projector) then predictor, one pass per view."""

    def __init__(self, encoder: Encoder, predictor: nn.Module):
        super().__init__()
        self.encoder, self.predictor = encoder, predictor

    def forward(self, *views: Tensor) -> tuple[Tensor, ...]:
        # each view is its own BatchNorm batch, as in BYOL
        return tuple(self.predictor(self.encoder(v)) for v in views)


class BYOL(Method):
    """Student: backbone -> projector (feature_dim-hidden-dim, BN, ReLU) -> predictor (dim-hidden-dim);
    teacher: a copy of backbone -> projector. Loss: the symmetric sum over the two views, in [0, 8]."""

    def __init__(self, backbone: nn.Module, *, proj_hidden_dim: int = 4096, proj_dim: int = 256,
                 pred_hidden_dim: int = 4096, syncbn: bool = False):
        super().__init__()
        encoder = Encoder(backbone, byol_projector(backbone.feature_dim, proj_hidden_dim, proj_dim))
        student = Online(encoder, byol_predictor(proj_dim, pred_hidden_dim))
        self.student = nn.SyncBatchNorm.convert_sync_batchnorm(student) if syncbn else student
        self.teacher = make_teacher(self.student.encoder)

    def forward(self, views: Sequence[Tensor]) -> Tensor:
        """views: two batches [N, 3, H, W] of the same images -> scalar loss."""
        x1, x2 = views
        p1, p2 = self.student_fn(x1, x2)
        with torch.no_grad():
            if self.keep_features:  # the same teacher graph for both views (one compiled graph)
                (z1, self.features), (z2, _) = self.teacher_fn(x1, True), self.teacher_fn(x2, True)
            else:
                z1, z2 = self.teacher_fn(x1), self.teacher_fn(x2)
        return byol_loss(p1, z2) + byol_loss(p2, z1)

    def smoothing_pairs(self) -> tuple[nn.Module, nn.Module]:
        return self.student.encoder, self.teacher
