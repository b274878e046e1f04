"""Write an ImageNet-layout tree of synthetic photo-like JPEGs with ImageNet's file statistics, for the
ImageNet-scale benchmarks on a machine without ImageNet.

    python benchmarks/make_imagenet_like.py OUT --images 128000 --classes 1000 [--val-images 5000] [--workers N]

OUT/train/<wnid>/<wnid>_<k>.JPEG and OUT/val/<wnid>/ILSVRC2012_val_<k>.JPEG, classes of equal size.
What the files are like (ImageNet's ILSVRC-2012 train set, for comparison: mean ~110 KB, most images
500 px on the long side, 500x375 the commonest size, a long tail of small and large ones, ~0.2 %
grayscale, a handful of CMYK JPEGs and one PNG named .JPEG):
- sizes: 70 % with a long side of 500 px (500x375, 500x333, 500x400, 500x500, 500x281; 1 in 5
  portrait), 25 % with a long side of 150-500 px and an aspect ratio of 1-1.7, 5 % with a long side
  of 600-2,000 px;
- content: a crop of one of a few smooth colour scenes with solid shapes (made once per process),
  recoloured per image, plus per-image grain, encoded at quality 80-95 with 4:2:0 chroma: the
  entropy decoder gets an ImageNet-like load (about 110 KB a file on average);
- 1 in 500 (at least one) a grayscale JPEG; 1 in 40,000 (at least one) a CMYK JPEG; exactly one
  train file is a PNG named .JPEG.
Every file is a pure function of (--seed, its index): the same tree whatever the worker count.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SCENES, SCENE_SIDE = 12, 1024  # base scenes per process, px
GRAIN_TILE = 1024  # px side of the precomputed grain tiles
GRAIN_STRENGTHS = (16, 20, 25, 30)  # standard deviations of the grain in levels, one tile each
GRAY_EVERY, CMYK_EVERY = 500, 40_000
_BANK: dict[int, tuple[list[Image.Image], list[np.ndarray]]] = {}  # seed -> (scenes, grain) of this process


def _scene(rng: np.random.Generator) -> np.ndarray:
    """A smooth colour field with a few solid shapes, float32 [S, S, 3] in 0..255."""
    field = np.zeros((SCENE_SIDE, SCENE_SIDE, 3), np.float32)
    for cells in (3, 6, 12, 24, 48):  # coarse to fine, finer weaker
        noise = rng.normal(0, 1, (cells, cells, 3)).astype(np.float32)
        up = np.stack([np.asarray(Image.fromarray(noise[..., c], mode="F").resize((SCENE_SIDE,) * 2, Image.BICUBIC))
                       for c in range(3)], -1)
        field += up * (48 / cells) ** 0.5
    field = rng.uniform(70, 180, 3) + 38 * field / field.std()
    pil = Image.fromarray(field.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(20, 60))):
        x0, y0 = (int(v) for v in rng.integers(0, SCENE_SIDE, 2))
        w, h = (int(v) for v in rng.integers(15, 300, 2))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0, y0, x0 + w, y0 + h], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return np.asarray(pil, dtype=np.float32)


def _bank(seed: int) -> tuple[list[Image.Image], list[np.ndarray]]:
    """This process's scenes (uint8 PIL images) and grain tiles (int16, one per strength), made once."""
    if seed not in _BANK:
        rng = np.random.default_rng([seed, 2**31])
        noise = rng.normal(0, 1, (GRAIN_TILE, GRAIN_TILE, 3)).astype(np.float32)
        grains = [np.rint(s * noise).astype(np.int16) for s in GRAIN_STRENGTHS]
        _BANK[seed] = [Image.fromarray(_scene(rng).clip(0, 255).astype(np.uint8)) for _ in range(SCENES)], grains
    return _BANK[seed]


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) in px from the size mix in the module docstring."""
    u = rng.random()
    if u < 0.70:
        short = int(rng.choice([375, 333, 400, 500, 281], p=[0.55, 0.25, 0.08, 0.07, 0.05]))
        long_ = 500
    elif u < 0.95:
        long_ = int(rng.integers(150, 501))
        short = max(32, round(long_ / rng.uniform(1.0, 1.7)))
    else:
        long_ = int(rng.integers(600, 2001))
        short = round(long_ / rng.uniform(1.2, 1.6))
    return (short, long_) if rng.random() < 0.2 else (long_, short)


def photo_jpeg(seed: int, index: int, mode: str = "RGB") -> bytes:
    """File `index` of the tree made with `seed`: JPEG bytes (or PNG bytes for mode "PNG")."""
    scenes, grains = _bank(seed)
    rng = np.random.default_rng([seed, index])
    width, height = image_size(rng)
    scene = scenes[int(rng.integers(SCENES))]
    side = int(rng.integers(SCENE_SIDE // 4, SCENE_SIDE + 1))  # the crop of the scene this image shows
    x0, y0 = (int(v) for v in rng.integers(0, SCENE_SIDE - side + 1, 2))
    image = scene.resize((width, height), Image.NEAREST, box=(x0, y0, x0 + side, y0 + side))  # a smooth scene
    gain, offset = rng.uniform(0.7, 1.3, (3, 1)), rng.uniform(-30, 30, (3, 1))  # recoloured through a lookup table
    image = image.point(np.rint(np.arange(256) * gain + offset).clip(0, 255).astype(np.uint8).ravel().tolist())
    grain = grains[int(rng.integers(len(grains)))]
    gy, gx = (int(rng.integers(0, GRAIN_TILE - n + 1)) if n <= GRAIN_TILE else 0 for n in (height, width))
    tile = grain[gy : gy + height, gx : gx + width]
    if tile.shape[:2] != (height, width):  # larger than the tile: repeat it
        tile = np.tile(tile, (-(-height // GRAIN_TILE), -(-width // GRAIN_TILE), 1))[:height, :width]
    image = Image.fromarray((np.asarray(image, dtype=np.int16) + tile).clip(0, 255).astype(np.uint8))
    out = io.BytesIO()
    if mode == "PNG":
        image.save(out, "PNG")
    else:
        image = image.convert("L") if mode == "L" else image.convert("CMYK") if mode == "CMYK" else image
        image.save(out, "JPEG", quality=int(rng.integers(80, 96)), subsampling=2)
    return out.getvalue()


def _mode(index: int, png_index: int) -> str:
    if index == png_index:
        return "PNG"
    if index % CMYK_EVERY == CMYK_EVERY // 2 or index == 1:
        return "CMYK"
    return "L" if index % GRAY_EVERY == GRAY_EVERY // 3 or index == 2 else "RGB"


def _write(job: tuple[int, list[tuple[int, str, str]]]) -> int:
    """Write one chunk of (index, path, mode); returns the bytes written."""
    seed, files = job
    total = 0
    for index, path, mode in files:
        data = photo_jpeg(seed, index, mode)
        Path(path).write_bytes(data)
        total += len(data)
    return total


def plan(out: Path, images: int, val_images: int, classes: int) -> list[tuple[int, str, str]]:
    """(index, path, mode) of every file: train indices first, then val; one PNG named .JPEG in train."""
    wnids = [f"n{10_000_000 + 7919 * c:08d}" for c in range(classes)]
    files = []
    for split, count, offset in (("train", images, 0), ("val", val_images, images)):
        for k in range(count):
            c = k % classes
            name = f"{wnids[c]}_{k // classes}.JPEG" if split == "train" else f"ILSVRC2012_val_{k + 1:08d}.JPEG"
            files.append((offset + k, str(out / split / wnids[c] / name), _mode(offset + k, images // 2)))
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, help="the tree's root (must not exist, or be empty)")
    ap.add_argument("--images", type=int, default=128_000, help="train images")
    ap.add_argument("--val-images", type=int, default=None, help="val images (default: images / 25, as ImageNet)")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None, help="processes (default: the usable cores)")
    args = ap.parse_args()
    val = args.images // 25 if args.val_images is None else args.val_images
    if args.images < 1 or val < 0 or not 1 <= args.classes <= args.images:
        ap.error(f"need 1 <= --classes ({args.classes}) <= --images ({args.images}) and --val-images >= 0")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        ap.error(f"{args.out} exists and is not an empty folder")
    files = plan(args.out, args.images, val, args.classes)
    for folder in sorted({str(Path(p).parent) for _, p, _ in files}):
        os.makedirs(folder, exist_ok=True)
    workers = args.workers or len(os.sched_getaffinity(0))
    chunks = [(args.seed, files[i : i + 256]) for i in range(0, len(files), 256)]
    started = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        total = sum(pool.map(_write, chunks))
    seconds = time.perf_counter() - started
    print(f"{len(files)} files ({args.images} train, {val} val, {args.classes} classes) in {args.out}: "
          f"{total / 2**30:.2f} GiB, mean {total / len(files) / 1e3:.1f} KB a file; {seconds:.0f} s with "
          f"{workers} processes ({len(files) / seconds:.0f} files/s)", file=sys.stderr)


if __name__ == "__main__":
    main()
