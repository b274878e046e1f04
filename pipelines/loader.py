"""One entry point for training data: a recipe and a dataset in, an iterator of augmented views out.

Backends (the CLI's `--loader`):
- "tensor": the images decoded once into a uint8 array on the training device and augmented by
  batched tensor ops (`tensor_backend.TensorLoader`); images of one size only.
- "dali": the files decoded and augmented by NVIDIA DALI every epoch (`dali_backend.DaliLoader`).
- "auto": "tensor" when the images are small (`sizes.image_sizes`: a median side of at most 64 px;
  one size) and their array takes under a quarter of the device's free memory (on CPU: always for
  small images), where batched ops were 8x faster than DALI at 32 px; "dali" otherwise, or "tensor"
  when DALI is not installed and the images, of one size, fit.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fastse.choices import LOADERS as BACKENDS  # the backends above (the CLI's --loader)

from .datasets import (
    SPLIT_NAMES,
    TORCHVISION_SETS,
    DataError,
    ImageFolderIndex,
    dataset_stats,
    load_uint8,
    resolve_data,
    scan_image_folder,
)
from .recipes import Recipe, get_recipe
from .sizes import image_sizes
from .tensor_backend import TensorLoader

if TYPE_CHECKING:
    from .dali_backend import DaliLoader

log = logging.getLogger(__name__)

MEMORY_SHARE = 0.25  # the uint8 array may take this share of the device's free memory


def build_loader(
    recipe: Recipe | str,
    data: str | Path | ImageFolderIndex,
    *,
    batch_size: int,
    device: str | torch.device,
    size: int | None = None,
    backend: str = "auto",
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    indices: np.ndarray | None = None,
    drop_last: bool = True,
    split: str | None = "train",
    cache_dir: str | Path | None = None,
) -> TensorLoader | DaliLoader:
    """A loader yielding `(views, labels)` batches of `recipe` over `data` for this rank.

    recipe: a recipes.Recipe (used as is, with its mean/std) or a recipe name, built at `size` px
    (default: `sizes.ImageSizes.default_size`: the images' side when they are small, else 224) and normalized by
    `datasets.dataset_stats` of the data. data: a class-folder tree, an archive of one, "cifar10" /
    "cifar100", or an ImageFolderIndex; `split` picks `<root>/<split>` where the tree has splits.
    `indices` restricts the loader to those samples (e.g. a labelled split). See the module
    docstring for `backend`; `cache_dir` holds extracted archives and decoded arrays.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown loader backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    index = data if isinstance(data, ImageFolderIndex) else _scan(data, split, cache_dir)
    if isinstance(recipe, str):
        name = data.lower() if isinstance(data, str) and data.lower() in TORCHVISION_SETS else index.root
        size = size or image_sizes(index).check().default_size
        recipe = get_recipe(recipe, size).with_stats(*dataset_stats(name, cache_dir=cache_dir))
    elif size is not None and size != recipe.size:
        raise ValueError(f"size={size} px, but the recipe {recipe.name!r} was built for {recipe.size} px")
    if backend == "auto":
        backend, why = choose_backend(index, device)
        log.info("loader: %s backend for %s (%s)", backend, index.root, why)
    common = dict(batch_size=batch_size, seed=seed, rank=rank, world_size=world_size, dtype=dtype,
                  channels_last=channels_last, drop_last=drop_last, indices=indices)
    if backend == "dali":
        from .dali_backend import DaliLoader, require_dali

        require_dali()
        return DaliLoader(index, None, recipe, device=device, **common)
    images, labels = load_uint8(index, cache_dir=cache_dir)
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # NCHW on the host: no second copy on the device
    return TensorLoader(images.to(device), torch.from_numpy(labels).to(device), recipe, **common)


@contextlib.contextmanager
def consumer_stream(loader: TensorLoader | DaliLoader, device: torch.device) -> Iterator[None]:
    """The context in which to consume `loader`'s batches (train on them): for a DALI loader on CUDA, a
    CUDA stream of the highest priority. DALI's streams and PyTorch's default stream have the lowest, so
    the GPU schedules the consumer's kernels first and DALI's decode and augmentation fill the gaps
    instead of delaying the step. Elsewhere the current stream. Work done before on the current stream
    is waited for on entry, and the consumer's on exit."""
    if torch.device(device).type != "cuda" or getattr(loader, "device_id", None) is None:
        yield
        return
    current = torch.cuda.current_stream(device)
    stream = torch.cuda.Stream(device, priority=torch.cuda.Stream.priority_range()[1])
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        yield
    current.wait_stream(stream)


def choose_backend(index: ImageFolderIndex, device: torch.device) -> tuple[str, str]:
    """("tensor" or "dali", the reason) for the images of `index` on `device` (see the module docstring)."""
    from .dali_backend import dali_available

    sizes = image_sizes(index).check()  # small images: of one size
    if len(sizes.off_shape()):
        if not dali_available():
            raise ImportError(f"{index.root}: the images differ in size, which only the DALI backend reads, and "
                              "NVIDIA DALI is not installed: pip install 'fastse[cu13]' (or 'fastse[cu12]')")
        return "dali", "the images differ in size"
    (height, width), side = sizes.shape, max(sizes.shape)
    need, free = len(index) * height * width * 3, _free_bytes(device)
    fits = need < MEMORY_SHARE * free
    mib = f"{need / 2**20:.0f} MiB of uint8 images, {free / 2**20:.0f} MiB free on {device}"
    if sizes.small and (fits or device.type == "cpu"):
        return "tensor", f"{side} px images, {mib}"
    if dali_available():
        return "dali", f"{side} px images, {mib}"
    if fits:
        return "tensor", f"{side} px images and NVIDIA DALI is not installed; {mib}"
    raise ImportError(f"{index.root}: {mib}: too large to hold in memory, and NVIDIA DALI is not installed: "
                      "pip install 'fastse[cu13]' (or 'fastse[cu12]')")


def _scan(data: str | Path, split: str | None, cache_dir: str | Path | None) -> ImageFolderIndex:
    root = resolve_data(data, cache_dir=cache_dir)
    if split and (root / split).is_dir():
        return scan_image_folder(root, split=split)
    splits = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name in SPLIT_NAMES)
    if split and splits:
        raise DataError(f"{root}: no {split}/ folder (the tree has {', '.join(splits)})")
    return scan_image_folder(root)


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
