"""MLP heads: BYOL's projector/predictor and MoCo v2's projection head."""

from __future__ import annotations

from torch import nn


class MLP(nn.Sequential):
    """Linear(in, hidden) -> BatchNorm1d -> ReLU -> Linear(hidden, out). Input [N, in] -> [N, out]."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, batchnorm: bool = True):
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim) if batchnorm else nn.Identity(),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )
        self.in_dim, self.out_dim = in_dim, out_dim


def byol_projector(in_dim: int = 2048, hidden_dim: int = 4096, out_dim: int = 256) -> MLP:
    """BYOL's projector g: backbone features -> 4096 (BN, ReLU) -> 256."""
    return MLP(in_dim, hidden_dim, out_dim)


def byol_predictor(dim: int = 256, hidden_dim: int = 4096) -> MLP:
    """BYOL's predictor q (student only): 256 -> 4096 (BN, ReLU) -> 256."""
    return MLP(dim, hidden_dim, dim)


def moco_head(in_dim: int = 2048, hidden_dim: int = 2048, out_dim: int = 128) -> MLP:
    """MoCo v2's MLP head: features -> 2048 (ReLU) -> 128, without BatchNorm as in MoCo v2."""
    return MLP(in_dim, hidden_dim, out_dim, batchnorm=False)
