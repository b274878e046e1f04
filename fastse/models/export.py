"""`backbone.safetensors`: a ResNet backbone exported to load into a plain torchvision ResNet.

The file holds the backbone's state_dict (torchvision names) and header metadata {"format", "arch",
"cifar_stem", "feature_dim", "fastse_version", "sha256"}, "sha256" being that of the tensor data (the
bytes after the header), which `load_backbone` verifies. `resnet_arch` tells the torchvision
architecture of a backbone from its structure.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

import fastse
from fastse.atomic import write_atomic
from fastse.models.resnet import resnet_backbone
from fastse.smoothing import unwrap
from fastse.tensorfiles import CheckpointError, cpu_tensors

log = logging.getLogger(__name__)

BACKBONE_FORMAT = "fastse-backbone/1"
FILE = "backbone.safetensors"

__all__ = ["BACKBONE_FORMAT", "FILE", "resnet_arch", "export_backbone", "load_backbone"]


def resnet_arch(net: nn.Module) -> tuple[str, bool]:
    """(torchvision arch name, CIFAR stem or not) of a ResNet backbone from `fastse.models.resnet_backbone`;
    ValueError for another network."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    try:
        depths = tuple(len(getattr(net, f"layer{i}")) for i in range(1, 5))
        block, conv1 = type(net.layer1[0]), net.conv1
    except (AttributeError, TypeError, IndexError):
        raise ValueError(f"export_backbone: a {type(net).__name__} is not a torchvision ResNet") from None
    archs = {(BasicBlock, (2, 2, 2, 2)): "resnet18", (BasicBlock, (3, 4, 6, 3)): "resnet34",
             (Bottleneck, (3, 4, 6, 3)): "resnet50", (Bottleneck, (3, 4, 23, 3)): "resnet101"}
    if (block, depths) not in archs:
        raise ValueError(f"export_backbone: unknown ResNet ({block.__name__} blocks, depths {depths})")
    return archs[block, depths], tuple(conv1.kernel_size) == (3, 3)


def export_backbone(path: str | Path, backbone: nn.Module) -> Path:
    """Write `backbone`'s state_dict (torchvision names; DDP/compile wrappers removed) as
    `backbone.safetensors` in the folder `path` (or to `path` itself if it ends in .safetensors),
    atomically, with header metadata {"format", "arch", "cifar_stem", "feature_dim", "fastse_version",
    "sha256"}: "sha256" is that of the tensor data (the bytes after the header), which `load_backbone`
    checks.

    Loading: `torchvision.models.<arch>()` then `load_state_dict(load_file(file), strict=False)`
    (only fc.weight / fc.bias missing; set `fc = nn.Identity()` for features). A CIFAR-stem export
    has a 3x3 conv1 and no max-pool: replace `conv1` with `nn.Conv2d(3, 64, 3, 1, 1, bias=False)` and
    `maxpool` with `nn.Identity()` first, or use `load_backbone`, which does that from the metadata."""
    net = unwrap(backbone)
    arch, cifar_stem = resnet_arch(net)
    path = Path(path)
    file = path if path.suffix == ".safetensors" else path / FILE
    file.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": BACKBONE_FORMAT, "arch": arch, "cifar_stem": str(cifar_stem).lower(),
            "feature_dim": str(getattr(net, "feature_dim", "")), "fastse_version": fastse.__version__}
    tensors = cpu_tensors("backbone", net.state_dict())
    meta["sha256"] = _tensor_data_sha256(st_save(tensors, metadata=meta))
    return write_atomic(file, st_save(tensors, metadata=meta))  # the same tensor data after a longer header


def _tensor_data_sha256(data: bytes) -> str:
    """The sha256 of a safetensors file's tensor data: the bytes after its 8-byte length and JSON header."""
    return hashlib.sha256(memoryview(data)[8 + int.from_bytes(data[:8], "little"):]).hexdigest()


def load_backbone(path: str | Path, *, device: str | torch.device = "cpu") -> nn.Module:
    """The ResNet backbone (fc = Identity, eval mode, on `device`) saved by `export_backbone`; CheckpointError
    where the tensor data does not match the sha256 in its header (a damaged file). An export without one
    (written before fastse checked them) loads with a warning."""
    path = Path(path)
    file = path / FILE if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"{file}: does not exist")
    try:
        with safe_open(file, "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors' own error types
        raise CheckpointError(f"{file}: not a safetensors file ({e})") from None
    if meta.get("format") != BACKBONE_FORMAT:
        raise CheckpointError(f"{file}: not a {BACKBONE_FORMAT} export (format {meta.get('format')!r})")
    data = file.read_bytes()
    if "sha256" not in meta:
        log.warning("%s: no checksum (exported before fastse checked backbones): loaded unverified", file)
    elif _tensor_data_sha256(data) != meta["sha256"]:
        raise CheckpointError(f"{file}: sha256 of its tensors does not match its header (the file is corrupt)")
    net = resnet_backbone(meta["arch"], cifar_stem=meta["cifar_stem"] == "true")
    net.load_state_dict(st_load(data))
    return net.to(device).eval()
