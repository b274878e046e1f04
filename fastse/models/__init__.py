"""Networks: ResNet backbones (torchvision, optional CIFAR stem), Wide ResNets (FixMatch), MLP heads."""

from fastse.models.heads import MLP, byol_predictor, byol_projector, moco_head
from fastse.models.resnet import resnet_backbone
from fastse.models.wide_resnet import WideResNet, wrn_28_2, wrn_28_8

__all__ = ["MLP", "byol_projector", "byol_predictor", "moco_head", "resnet_backbone", "WideResNet",
           "wrn_28_2", "wrn_28_8"]
