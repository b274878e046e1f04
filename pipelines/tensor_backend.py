"""Batched tensor augmentation: every op of every recipe on a whole uint8 batch held on its device.

For small images kept in device memory (CIFAR-10/100 at 32 px). A batch goes through each op as a
few whole-batch kernels; every random parameter is drawn per sample on the device from a
`torch.Generator`, per-sample probabilities are masks (`torch.where`), and nothing waits for the
device (no `.item()`, no boolean indexing, no Python loop over samples). At 32 px the cost is the
number of kernel launches, so views that start with the same ops share them: byol's and mocov2's
two views run as one batch of 2N up to the first op that differs.

Pixels are float32 in [0, 1] between ops. Choices where the reference implementations differ:
- Crop + flip is one `grid_sample` (bilinear, the crop's edge pixels repeated: torchvision's
  resized_crop; no antialiasing, which only matters where a crop is shrunk). FixMatch's
  translate (integer shift, reflect padding as `RandomCrop(padding_mode="reflect")`) + flip is an
  exact integer gather. The flip is applied to the crop's or shift's output: equal in distribution
  to a flip before it (crop positions and shifts are symmetric), and exact across colour ops.
- ColorJitter runs brightness, contrast, saturation, hue in that fixed order (recipes.py; torchvision
  draws a random order) with torchvision's formulas: contrast blends with the mean of the grey
  image, hue is the HSV hue shift, computed in closed form.
- RandAugment follows FixMatch's PyTorch code (PIL semantics): rotate about the centre, shear and
  translate about the top-left corner, one `grid_sample` per slot (bilinear where PIL uses nearest);
  the uncovered area and Cutout are filled with grey 128/255 as the DALI backend does. Contrast uses
  the float mean (PIL rounds it to a level); posterize and equalize quantize to round(255 x) first.
- Cutout: a square of round(size_frac * side) px centred on a uniform pixel, clipped at the border
  (FixMatch's reference cutout).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .recipes import RANDAUGMENT_POOL, RANDAUGMENT_RANGES, Op, Recipe, View
from .sampler import epoch_indices, rank_seed

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's and torchvision's grayscale
GREY = 128 / 255  # fill of Cutout and of the area RandAugment's geometric ops uncover
CROP_TRIES = 10  # RandomResizedCrop candidates per sample before the central-crop fallback

_SAMPLERS = frozenset({"random_resized_crop", "translate", "resize_center_crop"})
_FLIP_COMMUTES = frozenset({"color_jitter", "grayscale", "gaussian_blur", "solarize"})
_RA_GEOMETRY = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
_RA_BLEND = ("brightness", "color", "contrast", "sharpness")  # PIL ImageEnhance: blend with a degenerate image


@functools.lru_cache(maxsize=512)
def _const(values: tuple, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """A small constant tensor, made once per device (a host-to-device copy per call would sync)."""
    return torch.tensor(values, dtype=dtype, device=device).view(shape)


def _arange(n: int, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    return _const(tuple(range(n)), (n,), device, dtype)


def _per_sample(v: Tensor) -> Tensor:
    """[N] -> [N, 1, 1, 1], to broadcast a per-sample value over images."""
    return v[:, None, None, None]


# ----------------------------------------------------------------------------------- batched ops
# All take float images [N, C, H, W] in [0, 1] and per-sample parameters [N]; `mask` [N] bool, where
# given, leaves the samples where it is False unchanged.


def luma(x: Tensor) -> Tensor:
    """ITU-R 601 luma of RGB images [N, 3, H, W] -> [N, 1, H, W]."""
    return (x * _const(LUMA, (1, 3, 1, 1), x.device)).sum(1, keepdim=True)


def resized_crop(x: Tensor, boxes: Tensor, size: int, flip: Tensor | None = None) -> Tensor:
    """Crop boxes [N, 4] = (left, top, width, height) px out of x and resize each to size x size
    (bilinear, the crop's edge pixels repeated: torchvision's resized_crop without antialiasing, which
    only matters where a crop is shrunk); `flip` [N] bool mirrors the output horizontally."""
    n, c, h, w = x.shape
    corner, extent = boxes[:, :2, None], boxes[:, 2:, None]  # [N, 2, 1]: (x, y)
    centres = (_arange(size, x.device) + 0.5) / size
    pos = torch.addcmul(corner - 0.5, extent, centres).clamp_(corner, corner + extent - 1)  # input px, [N, 2, S]
    # to grid_sample's coordinates (align_corners=False): (2 p + 1) / side - 1
    scale, shift = _const((2 / w, 2 / h), (1, 2, 1), x.device), _const((1 / w - 1, 1 / h - 1), (1, 2, 1), x.device)
    gx, gy = torch.addcmul(shift, pos, scale).unbind(1)
    if flip is not None:
        gx = torch.where(flip[:, None], gx.flip(1), gx)
    grid = torch.stack([gx[:, None, :].expand(n, size, size), gy[:, :, None].expand(n, size, size)], -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _reflect(i: Tensor, n: int) -> Tensor:
    """Reflect integer coordinates into [0, n) about the edge pixels (numpy's "reflect"); |shift| < n."""
    return (n - 1) - ((n - 1) - i.abs()).abs()


def translate_reflect(x: Tensor, shifts: Tensor, flip: Tensor | None = None) -> Tensor:
    """Shift images [N, C, H, W] of any dtype by integer shifts [N, 2] = (dx, dy) px: output pixel
    (x, y) is input pixel (x + dx, y + dy), reflect-padded; `flip` [N] bool mirrors the output."""
    n, c, h, w = x.shape
    cols = _reflect(_arange(w, x.device, torch.int64) + shifts[:, :1], w)  # [N, W]
    rows = _reflect(_arange(h, x.device, torch.int64) + shifts[:, 1:], h)  # [N, H]
    if flip is not None:
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    index = (rows[:, :, None] * w + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return x.reshape(n, c, h * w).gather(2, index).view(n, c, h, w)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the HSV hue of RGB images by shift [N] turns (torchvision's adjust_hue), in closed form:
    V = max, C = max - min and S stay; channel n becomes V - C * clamp(min(k, 4 - k), 0, 1) with
    k = (n' + 6 H) mod 6, n' = 5, 3, 1 for R, G, B."""
    v, arg = x.max(1, keepdim=True)
    chroma = v - x.amin(1, keepdim=True)
    diff = (x.roll(-1, 1) - x.roll(-2, 1)) / chroma.clamp_min(1e-12)  # (G-B, B-R, R-G) / C
    sixths = diff.gather(1, arg) + 2 * arg  # hue in sixths of a turn, in [-1, 5]
    offset = _const((5.0, 3.0, 1.0), (1, 3, 1, 1), x.device) + _per_sample(6 * shift)
    k = (sixths + offset).remainder_(6)
    return v - chroma * torch.minimum(k, 4 - k).clamp_(0, 1)


def color_jitter(
    x: Tensor,
    brightness: Tensor | None = None,
    contrast: Tensor | None = None,
    saturation: Tensor | None = None,
    hue: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """torchvision's adjust_brightness, _contrast, _saturation (factors [N]) and adjust_hue (shift [N],
    turns), in that order, each clamped to [0, 1]; a component given as None is skipped."""
    y = x
    if brightness is not None:
        y = (y * _per_sample(brightness)).clamp_(0, 1)
    if contrast is not None:
        mean = y.mean((2, 3)) @ _const(LUMA, (3,), x.device)
        y = torch.lerp(_per_sample(mean), y, _per_sample(contrast)).clamp_(0, 1)
    if saturation is not None:
        y = torch.lerp(luma(y), y, _per_sample(saturation)).clamp_(0, 1)
    if hue is not None:
        y = adjust_hue(y, hue)
    return y if mask is None else torch.where(_per_sample(mask), y, x)


def solarize(x: Tensor, threshold: Tensor | float, mask: Tensor | None = None) -> Tensor:
    """Invert (1 - x) the pixels >= threshold ([N] or a float, 0..1 of the range)."""
    if mask is not None:
        threshold = torch.where(mask, threshold, 2.0)
    if isinstance(threshold, Tensor):
        threshold = _per_sample(threshold)
    return torch.where(x >= threshold, 1 - x, x)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int, mask: Tensor | None = None) -> Tensor:
    """Separable Gaussian blur with sigma [N] px per sample, an odd kernel_size, reflect padding
    (torchvision's gaussian_blur): per-sample 1-D kernels applied as one grouped convolution per axis."""
    n, c, h, w = x.shape
    r = kernel_size // 2
    t = _arange(kernel_size, x.device) - r
    kernel = torch.exp(-0.5 * (t / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [N*C, k]
    y = F.pad(x.reshape(1, n * c, h, w), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    y = F.conv2d(y, kernel.view(n * c, 1, 1, kernel_size), groups=n * c).view(n, c, h, w)
    return y if mask is None else torch.where(_per_sample(mask), y, x)


def autocontrast(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Stretch each channel's [min, max] to [0, 1] (PIL ImageOps.autocontrast); flat channels stay."""
    lo, hi = x.flatten(2).aminmax(dim=2)  # [N, C]
    ok = hi > lo
    if mask is not None:
        ok = ok & mask[:, None]
    scale = torch.where(ok, 1 / (hi - lo), 1.0)[:, :, None, None]
    lo = torch.where(ok, lo, 0.0)[:, :, None, None]
    return ((x - lo) * scale).clamp_(0, 1)


def posterize(x: Tensor, bits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Keep the top `bits` [N] (1..8) bits of each 8-bit level (PIL ImageOps.posterize)."""
    step = _per_sample(torch.exp2(8 - bits))
    y = ((x * 255).round_() / step).floor_() * (step / 255)
    return y if mask is None else torch.where(_per_sample(mask), y, x)


def equalize(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Histogram-equalize each channel of each image over its 256 levels (PIL ImageOps.equalize:
    lut[i] = (cumsum_before[i] + step // 2) // step with step = (pixels - count of the top level) // 255;
    a channel with step 0 stays)."""
    n, c, h, w = x.shape
    levels = (x * 255).round_().to(torch.int64).view(n * c, h * w)
    hist = torch.zeros(n * c, 256, dtype=torch.int64, device=x.device)
    hist.scatter_add_(1, levels, _const((1,), (1, 1), x.device, torch.int64).expand_as(levels))
    top = hist.gather(1, levels.amax(1, keepdim=True))
    step = (h * w - top) // 255
    lut = ((hist.cumsum(1) - hist + step // 2) // step.clamp_min(1)).clamp_max_(255)
    y = lut.gather(1, levels).view(n, c, h, w) / 255
    ok = (step > 0).view(n, c, 1, 1)
    if mask is not None:
        ok = ok & _per_sample(mask)
    return torch.where(ok, y, x)


def _smooth(x: Tensor) -> Tensor:
    """PIL's ImageFilter.SMOOTH ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13); the border pixels stay."""
    out = x.clone()
    out[..., 1:-1, 1:-1] = torch.add(F.avg_pool2d(x, 3, stride=1) * (9 / 13), x[..., 1:-1, 1:-1], alpha=4 / 13)
    return out


def randaugment(
    x: Tensor, ops: Tensor, magnitudes: Tensor, pool: Sequence[str] = RANDAUGMENT_POOL, fill: float = GREY
) -> Tensor:
    """FixMatch's RandAugment ops with PIL semantics, slot after slot: in slot s, sample n gets op
    pool[ops[n, s]] with magnitude magnitudes[n, s] in that op's units (recipes.RANDAUGMENT_RANGES:
    enhance factor, degrees, shear coefficient, fraction of the side, bits, threshold); ops < 0 skip.

    Each slot runs every op of the pool on the whole batch, masked to the samples that drew it: the
    geometric ops as one affine `grid_sample` (uncovered area = `fill`), the ImageEnhance blends as one
    lerp, then autocontrast, equalize, posterize, solarize. A sample has one op per slot, so the order
    within a slot does not matter.
    """
    n, _, h, w = x.shape
    slots = ops.shape[1]
    hot = ops[..., None] == _arange(len(pool), x.device, torch.int64)  # [N, S, K]
    sel = {name: hot[..., i] for i, name in enumerate(pool)}

    def amount(name: str) -> Tensor:  # the magnitude where `name` was drawn, else 0
        return magnitudes * sel[name] if name in sel else torch.zeros_like(magnitudes)

    def drawn(ids: list[int]) -> Tensor:  # [N, S]: one of the pool ops `ids` was drawn (a device index: no copy)
        return hot.index_select(2, _const(tuple(ids), (len(ids),), x.device, torch.int64)).any(-1)

    geometric = [pool.index(name) for name in _RA_GEOMETRY if name in sel]
    if geometric:
        moved = drawn(geometric)
        angle = amount("rotate") * (math.pi / 180)
        cos, sin = angle.cos(), angle.sin()
        shx, shy, tx, ty = (amount(name) for name in _RA_GEOMETRY[1:])
        r = h / w
        # output -> input map in grid coordinates (PIL's inverse affine): rotation about the centre,
        # shear and translation about the top-left corner; one op per sample and slot, so they add.
        theta = torch.stack([cos, (shx - sin) * r, shx * r + 2 * tx, (sin + shy) / r, cos, shy / r + 2 * ty], -1)
        theta = theta.view(n, slots, 2, 3)
    blend = [pool.index(name) for name in _RA_BLEND if name in sel]
    if blend:
        factor = torch.where(drawn(blend), magnitudes, 1.0)
    if "solarize" in sel:
        threshold = torch.where(sel["solarize"], magnitudes, 2.0)

    for s in range(slots):
        if geometric:
            grid = F.affine_grid(theta[:, s], list(x.shape), align_corners=False)
            warped = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            x = torch.where(_per_sample(moved[:, s]), warped + fill, x)
        if blend:  # PIL ImageEnhance: lerp(degenerate, image, factor); degenerate = x where unused
            degenerate = x
            if "brightness" in sel:
                degenerate = torch.where(_per_sample(sel["brightness"][:, s]), 0.0, degenerate)
            if "contrast" in sel:
                mean = x.mean((2, 3)) @ _const(LUMA, (3,), x.device)
                degenerate = torch.where(_per_sample(sel["contrast"][:, s]), _per_sample(mean), degenerate)
            if "color" in sel:
                degenerate = torch.where(_per_sample(sel["color"][:, s]), luma(x), degenerate)
            if "sharpness" in sel:
                degenerate = torch.where(_per_sample(sel["sharpness"][:, s]), _smooth(x), degenerate)
            x = torch.lerp(degenerate, x, _per_sample(factor[:, s])).clamp_(0, 1)
        if "autocontrast" in sel:
            x = autocontrast(x, sel["autocontrast"][:, s])
        if "equalize" in sel:
            x = equalize(x, sel["equalize"][:, s])
        if "posterize" in sel:
            x = posterize(x, magnitudes[:, s], sel["posterize"][:, s])
        if "solarize" in sel:
            x = solarize(x, threshold[:, s])
    return x


def cutout(x: Tensor, corners: Tensor, side: int, fill: float = GREY, mask: Tensor | None = None) -> Tensor:
    """Fill the square [x0, x0 + side) x [y0, y0 + side) with `fill`, corners [N, 2] = (x0, y0) px
    (may lie outside the image: the square is clipped)."""
    n, _, h, w = x.shape
    cols, rows = _arange(w, x.device), _arange(h, x.device)
    inside_x = (cols >= corners[:, :1]) & (cols < corners[:, :1] + side)  # [N, W]
    inside_y = (rows >= corners[:, 1:]) & (rows < corners[:, 1:] + side)  # [N, H]
    hole = inside_y[:, :, None] & inside_x[:, None, :]
    if mask is not None:
        hole = hole & mask[:, None, None]
    return torch.where(hole[:, None], fill, x)


# ------------------------------------------------------------------------------ random parameters


class _Draws:
    """Random parameters of one batch of `m` samples: uniforms handed out column by column from
    [m, 64] blocks drawn on the device, and the per-sample decisions recorded for tests."""

    def __init__(self, m: int, device: torch.device, generator: torch.Generator, size: int, record: dict | None):
        self.m, self.device, self.generator, self.size, self.record = m, device, generator, size, record
        self.flip: Op | None = None  # an hflip folded into the view's crop or translate
        self._block, self._next = None, 0

    def uniform(self, k: int) -> Tensor:
        """[m, k] uniforms in [0, 1)."""
        if self._block is None or self._next + k > self._block.shape[1]:
            self._block = torch.rand(self.m, max(64, k), device=self.device, generator=self.generator)
            self._next = 0
        self._next += k
        return self._block[:, self._next - k : self._next]

    def coin(self, p: float, name: str) -> Tensor | None:
        """A per-sample Bernoulli(p) mask, None when p >= 1 (always applied)."""
        mask = None if p >= 1 else self.uniform(1)[:, 0] < p
        if self.record is not None:
            self.record[name] = torch.ones(self.m, dtype=torch.bool, device=self.device) if mask is None else mask
        return mask

    def note(self, name: str, value: Tensor) -> None:
        if self.record is not None:
            self.record[name] = value


def crop_boxes(u: Tensor, h: int, w: int, scale: Sequence[float], ratio: Sequence[float]) -> Tensor:
    """torchvision's RandomResizedCrop boxes from uniforms u [N, 2 * CROP_TRIES + 2], vectorized:
    CROP_TRIES candidates per sample (area fraction uniform in `scale`, aspect ratio log-uniform in
    `ratio`), the first that fits the h x w image, else the central crop. -> [N, 4] (left, top, width, height)."""
    t = CROP_TRIES
    dev = u.device
    area = (h * w) * (scale[0] + (scale[1] - scale[0]) * u[:, :t])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    log_ratio = log_lo + (log_hi - log_lo) * u[:, t : 2 * t]
    # candidate (width, height) = round(sqrt(area * ratio)), round(sqrt(area / ratio)): [N, T, 2]
    wh = (area[..., None] * torch.exp(log_ratio[..., None] * _const((1.0, -1.0), (2,), dev))).sqrt_().round_()
    fits = ((wh >= 1) & (wh <= _const((w, h), (2,), dev))).all(-1)
    first = fits.to(torch.uint8).argmax(1)  # the first candidate that fits (0 if none)
    wh = wh.gather(1, first[:, None, None].expand(-1, 1, 2))[:, 0]
    corner = ((_const((w, h), (2,), dev) - wh + 1) * u[:, 2 * t : 2 * t + 2]).floor_()
    # fallback: the largest centred crop whose aspect ratio is within `ratio`
    if w / h < ratio[0]:
        fw, fh = w, int(round(w / ratio[0]))
    elif w / h > ratio[1]:
        fw, fh = int(round(h * ratio[1])), h
    else:
        fw, fh = w, h
    fallback = _const(((w - fw) // 2, (h - fh) // 2, fw, fh), (1, 4), dev)
    return torch.where(fits.any(1, keepdim=True), torch.cat([corner, wh], 1), fallback)


def _ra_magnitudes(ops: Tensor, u: Tensor, pool: tuple[str, ...]) -> Tensor:
    """Magnitudes uniform in each drawn op's RANDAUGMENT_RANGES (integers for integer ranges)."""
    table = []
    for name in pool:
        lo, hi = RANDAUGMENT_RANGES[name] or (0, 0)
        integer = isinstance(lo, int) and isinstance(hi, int)
        table.append((float(lo), float(hi - lo + integer), float(integer)))
    lo, span, integer = _const(tuple(table), (len(pool), 3), u.device)[ops].unbind(-1)
    m = torch.addcmul(lo, span, u)
    return torch.where(integer > 0, m.floor(), m)


# ---------------------------------------------------------------------------------------- steps
# One function per op of recipes.OPS: (images, op, draws) -> images. Samplers may get uint8 input.


def _to_float(x: Tensor) -> Tensor:
    return x / 255.0 if x.dtype == torch.uint8 else x


def _random_resized_crop(x: Tensor, op: Op, d: _Draws) -> Tensor:
    x = _to_float(x)
    h, w = x.shape[-2:]
    boxes = crop_boxes(d.uniform(2 * CROP_TRIES + 2), h, w, op.params["scale"], op.params["ratio"])
    on = d.coin(op.p, "random_resized_crop")
    if on is not None:  # not cropped: the whole image, resized
        boxes = torch.where(on[:, None], boxes, _const((0, 0, w, h), (1, 4), x.device))
    for i, key in enumerate(("crop_x", "crop_y", "crop_w", "crop_h")):
        d.note(key, boxes[:, i])
    flip = d.coin(d.flip.p, "hflip") if d.flip else None
    return resized_crop(x, boxes, d.size, flip)


def _translate(x: Tensor, op: Op, d: _Draws) -> Tensor:
    h, w = x.shape[-2:]
    pads = _const((round(op.params["pad_frac"] * w), round(op.params["pad_frac"] * h)), (1, 2), x.device)
    shifts = (d.uniform(2) * (2 * pads + 1)).floor_() - pads  # uniform integers in [-pad, pad]
    on = d.coin(op.p, "translate")
    if on is not None:
        shifts = shifts * on[:, None]
    d.note("translate_x", shifts[:, 0])
    d.note("translate_y", shifts[:, 1])
    flip = d.coin(d.flip.p, "hflip") if d.flip else None
    return translate_reflect(x, shifts.to(torch.int64), flip)


def _resize_center_crop(x: Tensor, op: Op, d: _Draws) -> Tensor:
    """torchvision's Resize(short side) + CenterCrop, deterministic."""
    x = _to_float(x)
    h, w = x.shape[-2:]
    short, size = op.params["resize"], d.size
    nh, nw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return x[..., top : top + size, left : left + size]


def _hflip(x: Tensor, op: Op, d: _Draws) -> Tensor:
    on = d.coin(op.p, "hflip")
    return x.flip(3) if on is None else torch.where(_per_sample(on), x.flip(3), x)


def _color_jitter(x: Tensor, op: Op, d: _Draws) -> Tensor:
    x = _to_float(x)
    on = d.coin(op.p, "color_jitter")
    names = ("brightness", "contrast", "saturation", "hue")
    amounts = [float(op.params.get(k, 0.0)) for k in names]
    lo = tuple(max(0.0, 1 - a) for a in amounts[:3]) + (-amounts[3],)
    hi = tuple(1 + a for a in amounts[:3]) + (amounts[3],)
    span = tuple(b - a for a, b in zip(lo, hi, strict=True))
    factors = torch.addcmul(_const(lo, (1, 4), x.device), _const(span, (1, 4), x.device), d.uniform(4))
    if d.record is not None:  # identity factors where the jitter is off
        shown = factors if on is None else torch.where(on[:, None], factors, _const((1.0, 1, 1, 0), (1, 4), x.device))
        for i, name in enumerate(names):
            d.note(name, shown[:, i])
    parts = [factors[:, i] if a > 0 else None for i, a in enumerate(amounts)]
    return color_jitter(x, *parts, mask=on)


def _grayscale(x: Tensor, op: Op, d: _Draws) -> Tensor:
    x = _to_float(x)
    on = d.coin(op.p, "grayscale")
    grey = luma(x)
    return grey.expand_as(x) if on is None else torch.where(_per_sample(on), grey, x)


def _gaussian_blur(x: Tensor, op: Op, d: _Draws) -> Tensor:
    x = _to_float(x)
    lo, hi = op.params["sigma"]
    sigma = lo + (hi - lo) * d.uniform(1)[:, 0]
    on = d.coin(op.p, "gaussian_blur")
    d.note("blur_sigma", sigma)
    kernel_size = int(op.params["kernel_frac"] * d.size) // 2 * 2 + 1  # odd; 23 at 224 px as in BYOL
    return x if kernel_size == 1 else gaussian_blur(x, sigma, kernel_size, on)


def _solarize(x: Tensor, op: Op, d: _Draws) -> Tensor:
    x = _to_float(x)
    return solarize(x, float(op.params["threshold"]), d.coin(op.p, "solarize"))


def _randaugment(x: Tensor, op: Op, d: _Draws) -> Tensor:
    x = _to_float(x)
    n, op_p, pool = op.params["n"], op.params["op_p"], tuple(op.params["pool"])
    u = d.uniform(3 * n)
    drawn = (u[:, :n] * len(pool)).to(torch.int64).clamp_max_(len(pool) - 1)  # uniform, with replacement
    applied = u[:, n : 2 * n] < op_p
    on = d.coin(op.p, "randaugment")
    if on is not None:
        applied = applied & on[:, None]
    ops = torch.where(applied, drawn, -1)
    magnitudes = _ra_magnitudes(drawn, u[:, 2 * n :], pool)
    for s in range(n):
        d.note(f"randaugment{s}", ops[:, s])
        d.note(f"randaugment{s}_magnitude", magnitudes[:, s])
    return randaugment(x, ops, magnitudes, pool)


def _cutout(x: Tensor, op: Op, d: _Draws) -> Tensor:
    x = _to_float(x)
    h, w = x.shape[-2:]
    side = round(op.params["size_frac"] * min(h, w))
    centre = (d.uniform(2) * _const((w, h), (1, 2), x.device)).floor_()
    on = d.coin(op.p, "cutout")
    d.note("cutout_x", centre[:, 0])
    d.note("cutout_y", centre[:, 1])
    return cutout(x, centre - side // 2, side, GREY, on)


_STEPS = {
    "random_resized_crop": _random_resized_crop,
    "resize_center_crop": _resize_center_crop,
    "hflip": _hflip,
    "translate": _translate,
    "color_jitter": _color_jitter,
    "grayscale": _grayscale,
    "gaussian_blur": _gaussian_blur,
    "solarize": _solarize,
    "randaugment": _randaugment,
    "cutout": _cutout,
}


def _run(x: Tensor, ops: Sequence[Op], d: _Draws) -> Tensor:
    """Apply ops in order; an hflip is folded into the crop/translate when only flip-commuting ops
    lie between them."""
    names = [op.name for op in ops]
    s = next((i for i, name in enumerate(names) if name in ("random_resized_crop", "translate")), None)
    f = names.index("hflip") if "hflip" in names else None
    fold = s is not None and f is not None and all(n in _FLIP_COMMUTES for n in names[min(s, f) + 1 : max(s, f)])
    d.flip = ops[f] if fold else None
    for i, op in enumerate(ops):
        if not (fold and i == f):
            x = _STEPS[op.name](x, op, d)
    return _to_float(x)


def check_view(view: View, size: int, image_hw: tuple[int, int]) -> None:
    """Fail fast on a view this backend cannot run on h x w images: one crop/translate/resize at
    most, before every op but hflip; images of the output size when there is no crop or resize."""
    names = [op.name for op in view.ops]
    samplers = [i for i, name in enumerate(names) if name in _SAMPLERS]
    if len(samplers) > 1:
        raise ValueError(f"tensor backend: a view holds at most one of {sorted(_SAMPLERS)}; got {names}")
    if samplers and any(name != "hflip" for name in names[: samplers[0]]):
        raise ValueError(f"tensor backend: {names[samplers[0]]} must come before every op but hflip; got {names}")
    if (not samplers or names[samplers[0]] == "translate") and tuple(image_hw) != (size, size):
        raise ValueError(
            f"tensor backend: images are {image_hw[0]}x{image_hw[1]} px but the view {names} has no crop or "
            f"resize to {size} px"
        )
    for op in view.ops:
        if op.params.get("size", size) != size:
            raise ValueError(f"tensor backend: op {op.name} is for {op.params['size']} px, the output is {size} px")
        if op.name == "translate" and op.params.get("padding", "reflect") != "reflect":
            raise ValueError(f"tensor backend: translate supports reflect padding only, not {op.params['padding']!r}")
        if op.name == "randaugment":
            pool = tuple(op.params["pool"])
            unknown = [name for name in pool if name not in RANDAUGMENT_RANGES]
            if unknown or len(set(pool)) != len(pool):
                raise ValueError(f"tensor backend: RandAugment pool {pool} has unknown or repeated ops {unknown}")


# --------------------------------------------------------------------------------------- views


def _nchw(batch: Tensor) -> Tensor:
    if batch.dtype != torch.uint8 or batch.ndim != 4 or 3 not in (batch.shape[1], batch.shape[3]):
        raise ValueError(f"expected uint8 images [N, 3, H, W] or [N, H, W, 3]; got {batch.dtype} {tuple(batch.shape)}")
    return batch if batch.shape[1] == 3 else batch.permute(0, 3, 1, 2).contiguous()


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype,
              channels_last: bool) -> Tensor:
    """(x - mean) / std into a fresh tensor of `dtype`, NCHW (channels_last memory when asked); `x` [N, 3, H, W]
    in [0, 1], or uint8 (divided by 255 first). The views' last step, and FixMatch's test images'."""
    x = _to_float(x)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=fmt)
    scale = _const(tuple(1 / s for s in std), (1, 3, 1, 1), x.device)
    shift = _const(tuple(-m / s for m, s in zip(mean, std, strict=True)), (1, 3, 1, 1), x.device)
    return torch.addcmul(shift, x, scale, out=out)


def augment_views(
    batch: Tensor,
    views: Sequence[View],
    *,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    return_params: bool = False,
) -> tuple[Tensor, ...] | tuple[tuple[Tensor, ...], tuple[dict[str, Tensor], ...]]:
    """Every view of a uint8 batch [N, 3, H, W] or [N, H, W, 3]: a tuple of normalized [N, 3, size, size]
    tensors of `dtype` on the batch's device, each with its own random draws from `generator` (a
    torch.Generator on that device). The ops the views share at their start run once on a batch of
    len(views) * N. With `return_params`, also a dict per view of per-sample decisions, each [N]:
    op name -> bool applied (hflip, color_jitter, grayscale, gaussian_blur, solarize, ...), jitter
    factors, crop_x/y/w/h, translate_x/y, randaugment{slot} (pool index, -1 skipped) and its
    _magnitude, cutout_x/y (centre)."""
    x = _nchw(batch)
    for view in views:
        check_view(view, size, x.shape[-2:])
    n, k = x.shape[0], 0
    while len(views) > 1 and all(len(v.ops) > k and v.ops[k] == views[0].ops[k] for v in views):
        k += 1
    records = tuple({} if return_params else None for _ in views)
    parts: Sequence[Tensor] = [x] * len(views)
    if k:
        shared = {} if return_params else None
        draws = _Draws(len(views) * n, x.device, generator, size, shared)
        parts = _run(x.repeat(len(views), 1, 1, 1), views[0].ops[:k], draws).split(n)
        for name, value in (shared or {}).items():
            for record, chunk in zip(records, value.split(n), strict=True):
                record[name] = chunk
    outs = tuple(
        normalize(_run(part, view.ops[k:], _Draws(n, x.device, generator, size, rec)), mean, std, dtype, channels_last)
        for part, view, rec in zip(parts, views, records, strict=True)
    )
    return (outs, records) if return_params else outs


# -------------------------------------------------------------------------------------- loader


class TensorLoader:
    """Batches of `recipe`'s views of a uint8 image array held on the training device.

    images: uint8 [N, H, W, 3] or [N, 3, H, W] on the training device (kept as NCHW; a numpy array
    stays on the CPU); labels [N]. Each epoch
    this rank reads its shard of `sampler.epoch_indices` (a full reshuffle; the ragged end dropped,
    or padded by wrapping with drop_last=False), gathers the batch on the device and augments it
    with a generator seeded from `sampler.rank_seed(seed, rank, epoch)`: same seed, same batches;
    ranks and epochs differ. Yields `(views, labels)`: a tuple of [B, 3, size, size] tensors of
    `dtype` and int64 labels [B], fresh for every batch. `indices` restricts it to those samples
    (e.g. a labelled split). Like DistributedSampler, call `set_epoch` before each epoch.
    `images_per_call`: batches are augmented a few thousand images at a time (rounded down to whole
    batches), since at 32 px the per-op launch cost, not the arithmetic, bounds the throughput.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor | np.ndarray | Sequence[int],
        recipe: Recipe,
        *,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        drop_last: bool = True,
        indices: Tensor | np.ndarray | Sequence[int] | None = None,
        images_per_call: int = 4096,
    ):
        self.images = _nchw(torch.as_tensor(images))
        self.device = self.images.device
        self.labels = torch.as_tensor(labels).to(self.device, torch.int64)
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"TensorLoader: {len(self.images)} images but labels of shape {tuple(self.labels.shape)}")
        for view in recipe.views:
            check_view(view, recipe.size, self.images.shape[-2:])
        self.subset = None if indices is None else torch.as_tensor(indices, dtype=torch.int64, device=self.device)
        self.recipe, self.batch_size, self.seed = recipe, batch_size, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.dtype, self.channels_last = dtype, channels_last
        self.batches_per_call = max(1, images_per_call // batch_size)
        self.epoch, self.start_batch = 0, 0
        self._n = len(self.images) if self.subset is None else len(self.subset)
        self._len = len(self._order(0)) // batch_size  # also validates batch_size, rank, world_size

    def _order(self, epoch: int) -> np.ndarray:
        return epoch_indices(self._n, epoch=epoch, seed=self.seed, rank=self.rank, world_size=self.world_size,
                             batch_size=self.batch_size, drop_last=self.drop_last)

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch the next iteration reads (its permutation and its random streams) and the
        batch it starts at (a resumed run's position; the earlier batches are drawn, not yielded)."""
        if not 0 <= start_batch <= self._len:
            raise ValueError(f"TensorLoader: start_batch={start_batch} is outside [0, {self._len}]")
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[tuple[tuple[Tensor, ...], Tensor]]:
        skip, self.start_batch = self.start_batch, 0  # a later pass reads the whole epoch
        for k, batch in enumerate(self._batches()):
            if k >= skip:
                yield batch

    def _batches(self) -> Iterator[tuple[tuple[Tensor, ...], Tensor]]:
        order = torch.from_numpy(self._order(self.epoch))
        if self.device.type == "cuda":
            order = order.pin_memory()
        order = order.to(self.device, non_blocking=True)  # once per epoch
        if self.subset is not None:
            order = self.subset[order]
        generator = torch.Generator(self.device).manual_seed(rank_seed(self.seed, self.rank, self.epoch))
        r, b = self.recipe, self.batch_size
        for group in order.split(b * self.batches_per_call):  # a few thousand images per call: fewer launches
            views = augment_views(self.images.index_select(0, group), r.views, size=r.size, mean=r.mean, std=r.std,
                                  generator=generator, dtype=self.dtype, channels_last=self.channels_last)
            labels = self.labels.index_select(0, group)
            for i in range(0, len(group), b):  # disjoint slices of tensors nothing else holds
                yield tuple(v[i : i + b] for v in views), labels[i : i + b]
