"""torchvision ResNets as backbones (classifier removed), with the CIFAR stem for 32 px inputs."""

from __future__ import annotations

import torchvision
from torch import nn

from fastse.choices import ARCHS  # re-exported: fastse.models.resnet.ARCHS


def resnet_backbone(arch: str = "resnet50", cifar_stem: bool = False) -> nn.Module:
    """A torchvision ResNet with `fc = Identity`: images [N, 3, H, W] -> features [N, D].

    `cifar_stem` replaces the 7x7/2 conv and max-pool with a 3x3/1 conv (the usual 32 px variant).
    The module keeps torchvision's parameter names, so its `state_dict` loads into
    `torchvision.models.<arch>()` (with `strict=False` for the missing `fc`). `.feature_dim` is D.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    net = getattr(torchvision.models, arch)(weights=None)
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net
