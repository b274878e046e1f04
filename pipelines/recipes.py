"""Augmentation recipes as data: an ordered tuple of ops per view, each with a probability and ranges.

A recipe says *what* to do; the backends (`fastse.pipelines.tensor_backend` for in-memory uint8
arrays, `fastse.pipelines.dali_backend` for image files) say *how*. Both read these objects and
nothing else, so a recipe is written once. Ranges are closed intervals; sizes are in pixels of the
output; colour magnitudes follow torchvision's conventions (brightness/contrast/saturation factor
drawn from [1 - x, 1 + x], hue shift from [-x, x] of a full turn).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from fastse.choices import AUGMENTATIONS as AUGMENTATIONS  # re-exported: the two-view recipes of pretraining

# Every op a backend must implement. Geometric ops first, then colour, then masking.
OPS = (
    "random_resized_crop",  # scale=(lo, hi) of the area, ratio=(lo, hi) aspect; output size x size
    "resize_center_crop",   # resize=short side in px, then a centre crop of size x size
    "hflip",                # horizontal flip (apply with probability p)
    "translate",            # pad_frac=max shift as a fraction of the side, padding="reflect"
    "color_jitter",         # brightness, contrast, saturation, hue; in that fixed order
    "grayscale",            # ITU-R 601 luma, replicated to 3 channels
    "gaussian_blur",        # sigma=(lo, hi); kernel_frac: kernel side as a fraction of the image side
    "solarize",             # threshold (0..1 of the range): pixels >= threshold are inverted
    "randaugment",          # n ops from pool, each applied with op_p, magnitude uniform per op/sample
    "cutout",               # size_frac: side of a square (fraction of the image side), filled grey
)

# FixMatch's RandAugment pool (Sohn et al. 2020, table 12): op -> range its magnitude is drawn from,
# uniformly per op and sample. Factors are PIL ImageEnhance factors (1 = unchanged); rotate in degrees;
# shear as the affine shear coefficient; translate as a fraction of the side; posterize in kept bits;
# solarize as the threshold (0..1 of the range). Ops without a magnitude map to None.
RANDAUGMENT_RANGES: dict[str, tuple[float, float] | None] = {
    "identity": None,
    "autocontrast": None,
    "brightness": (0.05, 0.95),
    "color": (0.05, 0.95),
    "contrast": (0.05, 0.95),
    "equalize": None,
    "posterize": (4, 8),
    "rotate": (-30.0, 30.0),
    "sharpness": (0.05, 0.95),
    "shear_x": (-0.3, 0.3),
    "shear_y": (-0.3, 0.3),
    "solarize": (0.0, 1.0),
    "translate_x": (-0.3, 0.3),
    "translate_y": (-0.3, 0.3),
}
RANDAUGMENT_POOL: tuple[str, ...] = tuple(RANDAUGMENT_RANGES)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
# px: images at most this are small (CIFAR-like): the small-image recipes (no blur; the test view is the
# image itself), and data whose median longer side is at most this is small (`sizes.ImageSizes.small`)
SMALL_SIDE = 64


@dataclass(frozen=True)
class Op:
    """One augmentation step: `name` from OPS, applied to each sample with probability `p`."""

    name: str
    p: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in OPS:
            raise ValueError(f"unknown op {self.name!r}; known: {', '.join(OPS)}")
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"op {self.name}: p={self.p} is outside [0, 1]")


@dataclass(frozen=True)
class View:
    """The ops that make one view of a sample, in order."""

    ops: tuple[Op, ...]

    def op(self, name: str) -> Op | None:
        return next((o for o in self.ops if o.name == name), None)


@dataclass(frozen=True)
class Recipe:
    """Views of one sample at `size` x `size` px, normalized by `mean`/`std` (0..1 scale)."""

    name: str
    views: tuple[View, ...]
    size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def with_stats(self, mean: tuple[float, float, float], std: tuple[float, float, float]) -> Recipe:
        return replace(self, mean=tuple(mean), std=tuple(std))


def _crop(size: int, scale: tuple[float, float]) -> Op:
    return Op("random_resized_crop", params={"size": size, "scale": scale, "ratio": (3 / 4, 4 / 3)})


def _jitter(b: float, c: float, s: float, h: float) -> Op:
    return Op("color_jitter", p=0.8, params={"brightness": b, "contrast": c, "saturation": s, "hue": h})


def _blur(p: float) -> Op:
    return Op("gaussian_blur", p=p, params={"sigma": (0.1, 2.0), "kernel_frac": 0.1})


def byol(size: int = 224) -> Recipe:
    """BYOL's asymmetric views (Grill et al. 2020). At <= SMALL_SIDE px (CIFAR) there is no blur."""
    small = size <= SMALL_SIDE
    common = (_crop(size, (0.08, 1.0)), Op("hflip", p=0.5), _jitter(0.4, 0.4, 0.2, 0.1), Op("grayscale", p=0.2))
    v1 = common + (() if small else (_blur(1.0),))
    v2 = common + (() if small else (_blur(0.1),)) + (Op("solarize", p=0.2, params={"threshold": 0.5}),)
    return Recipe("byol", (View(v1), View(v2)), size)


def mocov2(size: int = 224) -> Recipe:
    """MoCo v2: two views of one recipe (Chen et al. 2020). At <= SMALL_SIDE px (CIFAR) there is no blur."""
    small = size <= SMALL_SIDE
    ops = (_crop(size, (0.2, 1.0)), _jitter(0.4, 0.4, 0.4, 0.1), Op("grayscale", p=0.2))
    ops += (() if small else (_blur(0.5),)) + (Op("hflip", p=0.5),)
    return Recipe("mocov2", (View(ops), View(ops)), size)


def simclr(size: int = 224) -> Recipe:
    """SimCLR's two views of one recipe (Chen et al. 2020), colour strength 0.5 as its CIFAR runs (and
    lightly's CIFAR-10 benchmarks) use: jitter (0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2, flip,
    RandomResizedCrop (0.08-1); blur p=0.5 only above SMALL_SIDE px."""
    small = size <= SMALL_SIDE
    ops = (_crop(size, (0.08, 1.0)), Op("hflip", p=0.5), _jitter(0.4, 0.4, 0.4, 0.1), Op("grayscale", p=0.2))
    return Recipe("simclr", (View(ops + (() if small else (_blur(0.5),))),) * 2, size)


def fixmatch(size: int = 32) -> Recipe:
    """FixMatch's weak and strong views (Sohn et al. 2020): weak = flip + translate 12.5 % (reflect);
    strong = weak + RandAugment (2 ops, random magnitude, each p=0.5) + Cutout of half the side."""
    weak = (Op("hflip", p=0.5), Op("translate", params={"size": size, "pad_frac": 0.125, "padding": "reflect"}))
    strong = weak + (
        Op("randaugment", params={"n": 2, "op_p": 0.5, "pool": RANDAUGMENT_POOL}),
        Op("cutout", params={"size_frac": 0.5}),
    )
    return Recipe("fixmatch", (View(weak), View(strong)), size, CIFAR10_MEAN, CIFAR10_STD)


def linear(size: int = 224) -> Recipe:
    """Linear-evaluation training: RandomResizedCrop (0.08-1) + flip."""
    return Recipe("linear", (View((_crop(size, (0.08, 1.0)), Op("hflip", p=0.5))),), size)


def evaluation(size: int = 224) -> Recipe:
    """Test-time view: resize the short side to size * 256/224, centre crop; identity at <= SMALL_SIDE px."""
    if size <= SMALL_SIDE:
        return Recipe("eval", (View(()),), size)
    op = Op("resize_center_crop", params={"size": size, "resize": round(size * 256 / 224)})
    return Recipe("eval", (View((op,)),), size)


RECIPES = {"byol": byol, "mocov2": mocov2, "simclr": simclr, "fixmatch": fixmatch, "linear": linear,
           "eval": evaluation}
# AUGMENTATIONS (fastse.choices, imported above): the two-view recipes of RECIPES a pretraining run may use


def get_recipe(name: str, size: int) -> Recipe:
    """The recipe `name` at `size` px; unknown names fail with the list of known ones."""
    try:
        return RECIPES[name](size)
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}") from None
