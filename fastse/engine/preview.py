"""What the augmentation pipeline really produced: the first batch's views of a few images as one picture.

At the start of a run (pretraining: both views; FixMatch: the weak and strong views of unlabeled images)
the trainer hands the first training batch, before its step, to `write_views`: row i of the grid is view i
of the first `n` images, denormalised with the recipe's mean and std. It goes to `views.png` in the run
folder and, where wandb logs, to the run as an image. Written once per run folder (kept on resume).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastse.atomic import write_atomic

FILE = "views.png"
IMAGES = 8  # columns: the first images of the batch
PAD = 2  # px of white between the images
MIN_SIDE = 96  # px: smaller crops (CIFAR's 32) are enlarged by a whole factor, each pixel a square block


def view_grid(views: Sequence[Tensor], mean: Sequence[float], std: Sequence[float], n: int = IMAGES,
              pad: int = PAD, min_side: int = MIN_SIDE) -> np.ndarray:
    """uint8 RGB [V (kS + pad) - pad, n (kS + pad) - pad, 3]: view v of image i at row v, column i, each
    pixel a k x k block (k = ceil(min_side / S), 1 for S >= min_side). `views`: V batches [B, 3, S, S]
    normalised by `mean` / `std` (per channel, on the 0..1 scale), any dtype, device and memory format;
    pixels are x std + mean, clipped to [0, 1], x 255, rounded (a host copy: a sync)."""
    n = min(n, len(views[0]))
    k = max(1, -(-min_side // views[0].shape[-1]))
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    rows = []
    for v in views:
        x = (v[:n].detach().to("cpu", torch.float32) * s + m).clamp(0, 1).mul(255).round().to(torch.uint8)
        rows.append(x.permute(0, 2, 3, 1).numpy().repeat(k, axis=1).repeat(k, axis=2))  # [n, kS, kS, 3]
    side_h, side_w = rows[0].shape[1:3]
    grid = np.full((len(rows) * (side_h + pad) - pad, n * (side_w + pad) - pad, 3), 255, dtype=np.uint8)
    for r, images in enumerate(rows):
        for i, image in enumerate(images):
            top, left = r * (side_h + pad), i * (side_w + pad)
            grid[top:top + side_h, left:left + side_w] = image
    return grid


def write_views(run_dir: str | Path, views: Sequence[Tensor], recipe: Any, log: Any = None, *, step: int = 0,
                caption: str = "") -> Path | None:
    """The grid of `views` (a training batch of `recipe`, whose `mean`/`std` normalised it) as `views.png` in
    `run_dir` (atomically) and, through `log` (a `RunLog`), as the wandb image "views" at `step`. Nothing
    if the run folder has one already (a resumed run); returns the file written, else None."""
    from PIL import Image

    path = Path(run_dir) / FILE
    if path.exists():
        return None
    grid = view_grid(views, recipe.mean, recipe.std)
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    write_atomic(path, buffer.getvalue())
    if log is not None:
        log.image("views", path, step=step, caption=caption)
    return path


def read_png(path: str | Path) -> np.ndarray:
    """The RGB pixels uint8 [H, W, 3] of a PNG file (PNG is lossless: those `view_grid` returned)."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))
