"""Input-pipeline throughput, standalone (no model): images per second per recipe and backend.

    python benchmarks/pipelines.py [--data ../shared/data/cifar10-jpeg.tar.zst] [--device cuda]
        [--iters 160] [--warmup 16] [--recipes byol,mocov2,fixmatch,fixmatch_strong,linear,eval]
        [--backends tensor32,dali32,dali224] [--decode auto|shared|fused|both] [--json out.json]

Backends (rows):
  tensor32  tensor backend, 32 px, batch 512: the CIFAR-10 training set decoded once into a uint8
            array held on the device.
  dali32    DALI, 32 px, batch 512: the CIFAR-10 training JPEG files, decoded every batch.
  dali224   DALI, 224 px, batch 256: JPEGs of ImageNet size (400x350 px, quality 90, ~110 KB, grain
            and texture so the entropy decoder has an ImageNet-like load), made once into --cache.
img/s counts source images: each image of byol, mocov2 and fixmatch yields two views (column
`views`); fixmatch_strong is fixmatch's strong view alone. Timing: the first batch (DALI builds the
epoch's graph and fills its prefetch queue; reported as first_s), --warmup batches, then --iters
batches between torch.cuda.synchronize() calls (the tensor backend augments 8 batches of 512 per call:
with the defaults the timed batches hold exactly 20 such calls). No DALI graph is rebuilt while timing: the 224 px
file list repeats the made files to cover the timed batches in one epoch, and CIFAR's 97 batches
cover the defaults (beyond, epoch changes and their rebuilds are timed too). Also runs on CPU with
tiny counts:
    python benchmarks/pipelines.py --device cpu --iters 2 --warmup 1 --limit 1024 --n224 16
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from datetime import date
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

if find_spec("fastse") is None or find_spec("fastse.pipelines") is None:  # the checkout's fastse/ alone: no pipelines/
    sys.exit("fastse is not installed: pip install -e . first (in the checkout; make setup does it)")
from fastse.pipelines import datasets, recipes  # noqa: E402
from fastse.pipelines.dali_backend import DaliLoader, dali_available  # noqa: E402
from fastse.pipelines.tensor_backend import TensorLoader  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CIFAR_ARCHIVE = os.environ.get("FASTSE_CIFAR_ARCHIVE", REPO.parent / "shared/data/cifar10-jpeg.tar.zst")
RECIPES = ("byol", "mocov2", "fixmatch", "fixmatch_strong", "linear", "eval")
BACKENDS = {"tensor32": (32, 512), "dali32": (32, 512), "dali224": (224, 256)}  # px, batch
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def recipe_for(name: str, size: int) -> recipes.Recipe:
    if name == "fixmatch_strong":
        r = recipes.fixmatch(size)
        return replace(r, name=name, views=r.views[1:])
    return recipes.get_recipe(name, size)


# ------------------------------------------------------------------------------ ImageNet-size JPEGs


def _fractal(rng: np.random.Generator, h: int, w: int, octaves: tuple[int, ...]) -> np.ndarray:
    """Unit-variance noise summed over scales (cells per 350 px), finer scales weaker: texture."""
    out = np.zeros((h, w), np.float32)
    for k in octaves:
        cells = rng.normal(0, 1, (max(2, h * k // 350), max(2, w * k // 350))).astype(np.float32)
        out += np.asarray(Image.fromarray(cells, mode="F").resize((w, h), Image.BILINEAR)) * (64 / k) ** 0.5
    return out / out.std()


def photo_like_jpeg(seed: int, width: int = 400, height: int = 350, quality: int = 90) -> bytes:
    """A synthetic photo-like JPEG: smooth colour fields, a few solid shapes, fine grain (~110 KB)."""
    rng = np.random.default_rng(seed)
    coarse = (4, 8, 16, 32, 64, 128)
    luma = _fractal(rng, height, width, coarse)[..., None] * rng.uniform(0.6, 1.0, 3)
    chroma = np.stack([_fractal(rng, height, width, coarse) for _ in range(3)], -1)
    pil = Image.fromarray((rng.uniform(60, 190, 3) + 40 * (luma + 0.5 * chroma)).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(rng.integers(3, 10)):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        box = [x0, y0, x0 + rng.integers(20, 150), y0 + rng.integers(20, 150)]
        fill = tuple(int(v) for v in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    grain = _fractal(rng, height, width, (175, 350))[..., None] + 0.7 * rng.normal(0, 1, (height, width, 3))
    out = io.BytesIO()
    Image.fromarray((np.asarray(pil) + 44 * grain).clip(0, 255).astype(np.uint8)).save(out, "JPEG", quality=quality)
    return out.getvalue()


def _write_jpegs(job: tuple[Path, range]) -> None:
    folder, seeds = job
    for s in seeds:
        (folder / f"{s:05d}.jpg").write_bytes(photo_like_jpeg(s))


def imagenet_size_jpegs(cache: Path, n: int) -> list[Path]:
    """`n` photo-like 400x350 JPEGs under cache/bench-jpeg-400x350-<n>/img/, made once (in parallel)."""
    root = cache / f"bench-jpeg-400x350-{n}"
    folder = root / "img"
    if not (root / ".complete").exists():
        folder.mkdir(parents=True, exist_ok=True)
        workers = min(16, os.cpu_count() or 1)
        jobs = [(folder, range(i, min(n, i + 64))) for i in range(0, n, 64)]
        print(f"making {n} JPEGs of 400x350 px in {folder} ...", file=sys.stderr)
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_jpegs, jobs))
        (root / ".complete").touch()
    return sorted(folder.glob("*.jpg"))


# ------------------------------------------------------------------------------------------ timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(loader, *, warmup: int, iters: int, batch_size: int, device: torch.device) -> dict:
    """Source images per second over `iters` batches after the first batch and `warmup` more."""

    def batches():
        for epoch in itertools.count():
            loader.set_epoch(epoch)
            yield from loader

    start = time.perf_counter()
    it = batches()
    next(it)
    sync(device)
    first = time.perf_counter() - start
    for _ in range(warmup):
        next(it)
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        views, labels = next(it)
    sync(device)
    seconds = time.perf_counter() - start
    assert views[0].device.type == device.type and len(labels) == batch_size
    return {"img_s": iters * batch_size / seconds, "first_s": first}


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(CIFAR_ARCHIVE), help="CIFAR-10 JPEG tree or archive (train/<class>/*.jpg)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=160, help="timed batches per row")
    ap.add_argument("--warmup", type=int, default=16, help="untimed batches after the first")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--decode", choices=("auto", "shared", "fused", "both"), default="auto",
                    help="DALI: one decode shared by the views, or each view's crop fused into its own decode "
                         "(auto: fused for single-view recipes); both times two-view recipes each way")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--limit", type=int, default=None, help="use the first N CIFAR training images")
    ap.add_argument("--n224", type=int, default=2000, help="ImageNet-size JPEGs to make for dali224")
    ap.add_argument("--threads", type=int, default=None, help="DALI CPU threads (default: DaliLoader's)")
    ap.add_argument("--cache", type=Path, default=datasets.default_cache_dir())
    ap.add_argument("--json", type=Path, default=None, help="write the rows and the setup here")
    args = ap.parse_args()

    device = torch.device(args.device)
    names, backends = args.recipes.split(","), args.backends.split(",")
    for name in names:
        if name not in RECIPES:
            raise SystemExit(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    for backend in backends:
        if backend not in BACKENDS:
            raise SystemExit(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    if any(b.startswith("dali") for b in backends) and not dali_available():
        raise SystemExit("the dali rows need NVIDIA DALI: pip install 'fastse[cu13]' (or [cu12])")
    common = dict(dtype=DTYPES[args.dtype], channels_last=args.channels_last, seed=0)

    index = None
    if {"tensor32", "dali32"} & set(backends):
        index = datasets.scan_image_folder(datasets.resolve_data(args.data, cache_dir=args.cache), split="train")
        if args.limit:
            index = replace(index, files=index.files[: args.limit], labels=index.labels[: args.limit],
                            sizes=None if index.sizes is None else index.sizes[: args.limit])
    images = None
    if "tensor32" in backends:
        array, labels = datasets.load_uint8(index, cache_dir=args.cache)
        images = torch.from_numpy(array).to(device)
    large, mean_kb = [], None
    if "dali224" in backends:
        large = imagenet_size_jpegs(args.cache, args.n224)
        mean_kb = float(np.mean([f.stat().st_size for f in large]) / 1e3)
        print(f"{len(large)} JPEGs of 400x350 px, mean {mean_kb:.1f} KB", file=sys.stderr)

    rows = []
    for backend, name in itertools.product(backends, names):
        size, batch = BACKENDS[backend]
        recipe = recipe_for(name, size)
        if backend == "tensor32":
            loaders = {"": TensorLoader(images, labels, recipe, batch_size=batch, **common)}
        else:
            files = index.files if backend == "dali32" else large
            need = (args.warmup + args.iters + 2) * batch  # one epoch covers the timed batches
            files = files * max(1, -(-need // len(files))) if backend == "dali224" else files
            file_labels = np.zeros(len(files), np.int64) if backend == "dali224" else index.labels
            modes = {"auto": [None], "shared": [False], "fused": [True], "both": [False, True]}[args.decode]
            if not any(v.ops and v.ops[0].name == "random_resized_crop" for v in recipe.views):
                modes = modes[:1]  # nothing to fuse
            loaders = {("" if m is None else "fused" if m else "shared"): DaliLoader(
                files, file_labels, recipe, batch_size=batch, device=device, fused_decode=m, num_threads=args.threads,
                **common)
                for m in modes}
        for mode, loader in loaders.items():
            result = measure(loader, warmup=args.warmup, iters=args.iters, batch_size=batch, device=device)
            row = {"backend": backend + (f"-{mode}" if mode else ""), "px": size, "recipe": name,
                   "views": len(recipe.views), "batch": batch, **result}
            rows.append(row)
            print(f"{row['backend']:16s} {name:16s} {row['img_s']:>12,.0f} img/s  (first batch {row['first_s']:.2f} s)",
                  file=sys.stderr)

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    commit = os.environ.get("FASTSE_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip() or "?"
    print(f"\nInput pipelines on {gpu}, {date.today()}, commit {commit} ({args.dtype}, "
          f"channels_last={args.channels_last}); img/s = source images per second (two views each where views = 2)")
    if mean_kb is not None:
        print(f"dali224 reads {len(large)} JPEGs of 400x350 px, mean {mean_kb:.1f} KB")
    print("\n| backend | px | recipe | views | batch | img/s | first batch s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['px']} | {r['recipe']} | {r['views']} | {r['batch']} | {r['img_s']:,.0f} "
              f"| {r['first_s']:.2f} |")
    if args.json:
        dali = sys.modules.get("nvidia.dali")
        setup = {"date": date.today().isoformat(), "device": gpu, "commit": commit, "torch": torch.__version__,
                 "dali": getattr(dali, "__version__", None), "jpeg_224_mean_kb": mean_kb,
                 "args": {k: str(v) for k, v in vars(args).items()}}
        args.json.write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
