"""Every random decision of a recipe's views, drawn on the host for one batch: a pure function of
(seed, rank, epoch, batch) and the images' sizes, so a loader can start at any batch of any epoch and
reproduce it exactly, with no random state to carry.

`view_keys(view)` names the per-sample values a view needs, in a fixed order; `draw_batch` returns,
per view, a float32 array [B, len(keys)] of them (what the DALI graph reads, sample by sample) and
the same values by name. Values (torchvision's conventions, see `recipes`):
- random_resized_crop: `crop_y0, crop_x0, crop_y1, crop_x1`, the window as fractions of the image's
  height and width (torchvision's RandomResizedCrop: 10 tries of area and log-aspect, then the
  centre crop clamped to the ratio range).
- hflip: `hflip` 1/0. translate: `translate_y/x`, integer shifts in px in [-pad, pad].
- color_jitter: `color_jitter` 1/0 (the p gate) and the factors `brightness, contrast, saturation`
  (1 where the gate is off) and `hue` (a fraction of a turn; 0 where off).
- grayscale, solarize: `grayscale`, `solarize` 1/0; `solarize_threshold` in levels, 256 (inverts
  nothing) where off. gaussian_blur: `blur_sigma`, and the gate `gaussian_blur` 1/0 where p < 1.
- randaugment: per slot `randaugment{k}` the pool index, or -1 where the slot is skipped, and
  `randaugment{k}_magnitude` drawn from that op's range (integer bits for posterize; 0 without a range).
- cutout: `cutout_y/x`, the integer centre in px.
"""

from __future__ import annotations

import math

import numpy as np

from .recipes import RANDAUGMENT_RANGES, Recipe, View

CROP_TRIES = 10  # torchvision's RandomResizedCrop attempts before its centre-crop fallback


def view_keys(view: View) -> tuple[str, ...]:
    """The names of the per-sample values `view` needs, in the order `draw_batch` writes them."""
    keys: list[str] = []
    for op in view.ops:
        if op.name == "random_resized_crop":
            keys += ["crop_y0", "crop_x0", "crop_y1", "crop_x1"]
        elif op.name == "hflip":
            keys.append("hflip")
        elif op.name == "translate":
            keys += ["translate_y", "translate_x"]
        elif op.name == "color_jitter":
            keys += ["color_jitter", "brightness", "contrast", "saturation", "hue"]
        elif op.name == "grayscale":
            keys.append("grayscale")
        elif op.name == "gaussian_blur":
            keys += ["blur_sigma"] + (["gaussian_blur"] if op.p < 1 else [])
        elif op.name == "solarize":
            keys += ["solarize", "solarize_threshold"]
        elif op.name == "randaugment":
            for k in range(op.params["n"]):
                keys += [f"randaugment{k}", f"randaugment{k}_magnitude"]
        elif op.name == "cutout":
            keys += ["cutout_y", "cutout_x"]
    if len(set(keys)) != len(keys):
        raise ValueError(f"a view has an op twice ({', '.join(o.name for o in view.ops)}): one of each is supported")
    return tuple(keys)


def batch_rng(seed: int, rank: int, epoch: int, batch: int) -> np.random.Generator:
    """The generator of one batch's decisions: distinct per (seed, rank, epoch, batch), reproducible."""
    if min(seed, rank, epoch, batch) < 0:
        raise ValueError(f"batch_rng: seed={seed}, rank={rank}, epoch={epoch}, batch={batch} must be >= 0")
    return np.random.default_rng([seed, rank, epoch, batch])


def draw_batch(recipe: Recipe, rng: np.random.Generator, shapes: np.ndarray
               ) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Per view of `recipe`: (float32 [B, len(view_keys)], {key: float32 [B]}) for B images whose
    (height, width) in px, as decoded, are the rows of `shapes` (int [B, 2])."""
    n = len(shapes)
    out = []
    for view in recipe.views:
        values: dict[str, np.ndarray] = {}
        for op in view.ops:
            values.update(_DRAW[op.name](op, rng, n, shapes, recipe.size))
        keys = view_keys(view)
        table = np.stack([values[k] for k in keys], 1).astype(np.float32) if keys else np.zeros((n, 0), np.float32)
        out.append((table, {k: table[:, i] for i, k in enumerate(keys)}))
    return out


def _coin(rng: np.random.Generator, p: float, n: int) -> np.ndarray:
    return (rng.random(n) < p).astype(np.float32)


def _crop(op, rng, n, shapes, size):
    """torchvision RandomResizedCrop's window for each (height, width), as fractions of the sides."""
    h, w = (shapes[:, i].astype(np.float64) for i in (0, 1))
    lo, hi = op.params["scale"]
    r_lo, r_hi = op.params["ratio"]
    target = (h * w)[:, None] * rng.uniform(lo, hi, (n, CROP_TRIES))
    aspect = np.exp(rng.uniform(math.log(r_lo), math.log(r_hi), (n, CROP_TRIES)))
    cw, ch = np.rint(np.sqrt(target * aspect)), np.rint(np.sqrt(target / aspect))
    fits = (cw > 0) & (ch > 0) & (cw <= w[:, None]) & (ch <= h[:, None])
    first, found = fits.argmax(1), fits.any(1)
    rows = np.arange(n)
    ratio = w / h  # the fallback: the whole image, cut to the nearest allowed aspect ratio
    fw = np.where(ratio > r_hi, np.rint(h * r_hi), w)
    fh = np.where(ratio < r_lo, np.rint(w / r_lo), h)
    cw, ch = np.where(found, cw[rows, first], fw), np.where(found, ch[rows, first], fh)
    top = np.where(found, np.floor(rng.random(n) * (h - ch + 1)), (h - ch) // 2)
    left = np.where(found, np.floor(rng.random(n) * (w - cw + 1)), (w - cw) // 2)
    return {"crop_y0": top / h, "crop_x0": left / w, "crop_y1": (top + ch) / h, "crop_x1": (left + cw) / w}


def _hflip(op, rng, n, shapes, size):
    return {"hflip": _coin(rng, op.p, n)}


def _translate(op, rng, n, shapes, size):
    pad = round(op.params["pad_frac"] * op.params["size"])
    return {f"translate_{axis}": rng.integers(-pad, pad + 1, n).astype(np.float32) for axis in "yx"}


def _color_jitter(op, rng, n, shapes, size):
    p, on = op.params, _coin(rng, op.p, n)
    out = {"color_jitter": on}
    for key in ("brightness", "contrast", "saturation"):
        out[key] = 1 + on * (rng.uniform(1 - p[key], 1 + p[key], n) - 1)
    out["hue"] = on * rng.uniform(-p["hue"], p["hue"], n)
    return out


def _grayscale(op, rng, n, shapes, size):
    return {"grayscale": _coin(rng, op.p, n)}


def _gaussian_blur(op, rng, n, shapes, size):
    out = {"blur_sigma": rng.uniform(*op.params["sigma"], n)}
    if op.p < 1:
        out["gaussian_blur"] = _coin(rng, op.p, n)
    return out


def _solarize(op, rng, n, shapes, size):
    on = _coin(rng, op.p, n)
    return {"solarize": on, "solarize_threshold": 256 - on * (256 - 255 * op.params["threshold"])}


def _randaugment(op, rng, n, shapes, size):
    pool, out = list(op.params["pool"]), {}
    for k in range(op.params["n"]):
        which = rng.integers(0, len(pool), n)
        on = rng.random(n) < op.params["op_p"]
        magnitude = np.zeros(n)
        for i, name in enumerate(pool):
            rng_range, chosen = RANDAUGMENT_RANGES[name], which == i
            if rng_range is None or not chosen.any():
                continue
            lo, hi = rng_range
            draw = (rng.integers(int(lo), int(hi) + 1, chosen.sum()) if name == "posterize"
                    else rng.uniform(lo, hi, chosen.sum()))
            magnitude[chosen] = draw
        out[f"randaugment{k}"] = np.where(on, which, -1)
        out[f"randaugment{k}_magnitude"] = magnitude
    return out


def _cutout(op, rng, n, shapes, size):
    return {f"cutout_{axis}": rng.integers(0, size, n).astype(np.float32) for axis in "yx"}


_DRAW = {
    "random_resized_crop": _crop,
    "resize_center_crop": lambda op, rng, n, shapes, size: {},
    "hflip": _hflip,
    "translate": _translate,
    "color_jitter": _color_jitter,
    "grayscale": _grayscale,
    "gaussian_blur": _gaussian_blur,
    "solarize": _solarize,
    "randaugment": _randaugment,
    "cutout": _cutout,
}
