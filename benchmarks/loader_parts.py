"""Where a DaliLoader's rate comes from, part by part, on an image-folder tree (no model):

    python benchmarks/loader_parts.py --data <ImageNet-layout tree> [--recipe mocov2] [--shares 1,0.75,0.5,0]
    python benchmarks/loader_parts.py --data <tree> --device cpu --batches 4 --shares 1   (CPU smoke run)

Rows (img/s, source images):
  prepare xN    the host side alone: `_prepare` of whole batches (files read, headers parsed, decisions
                drawn) on N threads at once (1, and the loader's own pool)
  read x1       the file reads alone, one thread
  DALI, share   the pipeline alone: batches prepared once are fed again and again (no host side), with
                that share of the JPEGs decoded on DALI's CPU threads and the rest on nvJPEG (0: all
                on the hardware decoder)
  loader, share the loader as a training loop draws it (host side and pipeline together)
  decode-only   libjpeg-turbo alone in a DALI CPU pipeline, on 1 and all threads
A loader row well below both its DALI row and the prepare row means the two sides starve each other.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from importlib.util import find_spec

import numpy as np
import torch

if find_spec("fastse") is None or find_spec("fastse.pipelines") is None:  # the checkout's fastse/ alone: no pipelines/
    sys.exit("fastse is not installed: pip install -e . first (in the checkout; make setup does it)")
from fastse.pipelines import recipes  # noqa: E402
from fastse.pipelines.dali_backend import DaliLoader, default_threads, require_dali  # noqa: E402
from fastse.pipelines.datasets import resolve_data, scan_image_folder  # noqa: E402
from steptime import timed  # noqa: E402  (benchmarks/steptime.py)


def rate(n_images: int, run, cuda: bool) -> float:
    """img/s of one call of `run()`, which handles `n_images` images (timed between CUDA synchronisations)."""
    return n_images / timed(run, 1, cuda)


def dali_alone(loader: DaliLoader, batches: list, n: int) -> float:
    """The loader's pipeline fed `batches` (already prepared) round after round: DALI's own rate."""
    pipe = loader.pipeline()
    pipe.build()
    cuda = loader.device_id is not None

    def feed(i: int) -> None:
        loader._feed_batch(pipe, batches[i % len(batches)])

    for i in range(loader.prefetch):
        feed(i)
    pipe.schedule_run()
    fed = loader.prefetch

    def draw(k: int) -> None:
        nonlocal fed
        for _ in range(k):
            pipe.outputs()
            feed(fed)
            fed += 1
            pipe.schedule_run()

    draw(2)
    return rate(n * loader.batch_size, lambda: draw(n), cuda)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="class-folder tree (train/ is used where it exists)")
    ap.add_argument("--recipe", default="mocov2", choices=sorted(recipes.RECIPES))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--batches", type=int, default=40, help="batches per timed row")
    ap.add_argument("--shares", default="1,0.75,0.5,0", help="CPU-decode shares of the DALI and loader rows")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    require_dali()
    root = resolve_data(args.data)
    index = scan_image_folder(root, split="train" if (root / "train").is_dir() else None)
    recipe, bs, n = recipes.get_recipe(args.recipe, args.size), args.batch_size, args.batches
    cuda = args.device != "cpu"
    if len(index) < bs:
        sys.exit(f"{root}: {len(index)} images, fewer than one batch of {bs}")

    def make(**kw) -> DaliLoader:
        return DaliLoader(index, None, recipe, batch_size=bs, device=args.device, dtype=torch.bfloat16,
                          channels_last=cuda, **kw)

    loader = make()
    steps = len(loader)
    keys = [(i // steps, i % steps) for i in range(n)]
    rows = [("read x1", rate(n * bs, lambda: [loader._read(np.arange(bs) + (k % steps) * bs) for k in range(n)],
                             False), "-")]
    batches = []
    rows.append(("prepare x1", rate(n * bs, lambda: batches.extend(loader._prepare(k) for k in keys), False), "-"))
    pool = loader._preparer._max_workers
    with ThreadPoolExecutor(pool) as ex:
        later = [(e + 2, b) for e, b in keys]
        rows.append((f"prepare x{pool}", rate(n * bs, lambda: list(ex.map(loader._prepare, later)), False), "-"))
    loader.close()
    for share in [float(s) for s in args.shares.split(",")] if cuda else [1.0]:
        extra = {"cpu_decode": share, **({"hw_decoder_load": 1.0} if share == 0 else {})} if cuda else {}
        dali = make(**extra)
        rows.append((f"DALI, share {share:g}", dali_alone(dali, batches[:8], n), dali.num_threads))
        stream = make(**extra)
        it = iter(stream)
        next(it)
        rows.append((f"loader, share {share:g}", rate(n * bs, lambda: [next(it) for _ in range(min(n, steps - 1))],
                                                      cuda) * min(n, steps - 1) / n, stream.num_threads))
        stream.close()
        dali.close()
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=bs, device_id=None, prefetch_queue_depth=1)
    def decode_only():
        return fn.decoders.image(fn.external_source(name="j", dtype=types.UINT8, ndim=1, no_copy=True),
                                 device="cpu", output_type=types.RGB)

    jpegs = [b.jpegs for b in batches[:8]]
    for threads in sorted({1, default_threads(gpu=False)}):
        pipe = decode_only(num_threads=threads)
        pipe.build()
        k = max(1, min(n, 2 if threads == 1 else 8))

        def run(pipe=pipe, k=k):
            for i in range(k):
                pipe.feed_input("j", jpegs[i % len(jpegs)])
                pipe.run()

        rows.append((f"decode-only x{threads}", rate(k * bs, run, False), threads))
        del pipe
    gpu = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"# {date.today()}, {gpu}, {args.recipe} at {args.size} px, batch {bs}, {len(index):,} images of {root}")
    print("| part | img/s | DALI threads |\n|---|---|---|")
    for name, value, threads in rows:
        print(f"| {name} | {value:,.0f} | {threads} |")


if __name__ == "__main__":
    main()
