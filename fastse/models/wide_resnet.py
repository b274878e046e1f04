"""Wide ResNet as FixMatch uses it (Zagoruyko & Komodakis 2016; Sohn et al. 2020).

Pre-activation blocks, BatchNorm momentum 0.001, LeakyReLU(0.1), He-normal conv init, Xavier-normal
linear init, zero biases. Input [N, 3, 32, 32] -> logits [N, num_classes].
"""

from __future__ import annotations

import torch
from torch import nn


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, momentum=0.001)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, activate_before_residual: bool):
        super().__init__()
        self.bn1, self.relu1 = _bn(cin), nn.LeakyReLU(0.1, inplace=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.relu2 = _bn(cout), nn.LeakyReLU(0.1, inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if cin == cout else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
        self.activate_before_residual = activate_before_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.relu1(self.bn1(x))
        skip = o if self.activate_before_residual else x  # as in FixMatch's reference (TF) code
        y = self.conv2(self.relu2(self.bn2(self.conv1(o))))
        return y + (skip if self.shortcut is None else self.shortcut(skip))


class WideResNet(nn.Module):
    """WRN-depth-widen: 3 groups of (depth-4)/6 blocks with 16k, 32k, 64k channels."""

    def __init__(self, num_classes: int, depth: int = 28, widen: int = 2, dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        groups = []
        for g in range(3):
            blocks = [_Block(ch[g] if b == 0 else ch[g + 1], ch[g + 1], (1 if g == 0 else 2) if b == 0 else 1,
                             activate_before_residual=(g == 0 and b == 0)) for b in range(n)]
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn, self.relu = _bn(ch[3]), nn.LeakyReLU(0.1, inplace=True)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc = nn.Linear(ch[3], num_classes)
        self.feature_dim = ch[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.relu(self.bn(x)), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.features(x)))


def wrn_28_2(num_classes: int = 10) -> WideResNet:
    """WRN-28-2 (1.47 M parameters), FixMatch's CIFAR-10 model."""
    return WideResNet(num_classes, 28, 2)


def wrn_28_8(num_classes: int = 100) -> WideResNet:
    """WRN-28-8 (23.4 M parameters), FixMatch's CIFAR-100 model."""
    return WideResNet(num_classes, 28, 8)
