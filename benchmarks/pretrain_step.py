"""Pretraining step throughput: the real input pipeline against the same compiled step on a fixed
batch already on the GPU (what the loader must not slow down), measured in one run.

    python benchmarks/pretrain_step.py --preset byol-cifar10 --data <CIFAR-10 JPEG tree> [--steps 300]
    python benchmarks/pretrain_step.py --preset byol-cifar10 --data <tree> --compile-mode default
    python benchmarks/pretrain_step.py --preset byol-imagenet --data <ImageNet-layout tree> --loader dali
    python benchmarks/pretrain_step.py --preset byol-imagenet --photo-jpegs 4000 --loader dali

Builds a `Trainer` (model, optimizer, smoother, compile, bf16 as the preset says), warms both paths
up, then times `--rounds` alternating blocks of `--steps` steps: `real` draws each batch from the
training loader (augmentation included), `synthetic` reuses one batch of the same shape and dtype.
Both run `Trainer.train_step` (forward, backward, optimizer, teacher update); a third path, `loader`,
only draws batches (no model: the pipeline's own rate in the same process, its headroom over the step).
img/s per block is steps x batch / wall time between CUDA synchronisations; the table gives the median
of the blocks and real / synthetic. Blocks run on across epoch ends (a new epoch reshuffles; DALI also
builds the epoch's graph), so a short epoch (few images) weighs its start more than a full dataset would.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from steptime import profile, timed  # noqa: E402  (benchmarks/steptime.py)

from fastse.config import COMPILE_MODES, PRESETS, preset  # noqa: E402
from fastse.engine.trainer import Trainer  # noqa: E402


def batches(loader):
    """Endless batches of views from the training loader, epoch after epoch."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        for views, _ in loader:
            yield views


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="byol-cifar10")
    ap.add_argument("--data", help="class-folder tree (or archive) of the training images")
    ap.add_argument("--photo-jpegs", type=int, metavar="N",
                    help="instead of --data: N photo-like 400x350 JPEGs of ~110 KB made once in the cache "
                         "(benchmarks/pipelines.py's ImageNet-size set), for the 224 px DALI row")
    ap.add_argument("--loader", default="auto", choices=("auto", "tensor", "dali"))
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--compile-mode", choices=COMPILE_MODES,
                    help="torch.compile mode of the step (reduce-overhead: CUDA graphs); default: the preset's")
    ap.add_argument("--dali-stream-priority", type=int, metavar="P",
                    help="CUDA priority of the DALI loader's streams (lower runs first; PyTorch's are 0)")
    ap.add_argument("--steps", type=int, default=300, help="steps per timed block")
    ap.add_argument("--rounds", type=int, default=3, help="alternating real/synthetic block pairs")
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--limit", type=int, default=None, help="at most N images (CPU smoke runs)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="then profile N steps of each path: GPU busy time per step against wall time per step "
                         "(GPU-bound when they match, host-bound when the GPU idles), and the top operators")
    args = ap.parse_args()
    if (args.data is None) == (args.photo_jpegs is None):
        ap.error("give exactly one of --data and --photo-jpegs")
    if args.photo_jpegs:
        import importlib.util

        from fastse.pipelines.datasets import default_cache_dir

        spec = importlib.util.spec_from_file_location("bench_pipelines", Path(__file__).with_name("pipelines.py"))
        bench_pipelines = sys.modules["bench_pipelines"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench_pipelines)
        args.data = str(bench_pipelines.imagenet_size_jpegs(default_cache_dir(), args.photo_jpegs)[0].parents[1])

    overrides = dict(data=args.data, loader=args.loader, device=args.device, wandb="disabled", knn_every=0,
                     limit=args.limit, out=tempfile.mkdtemp(prefix="fastse-bench-"))
    if args.compile_mode:
        overrides["compile_mode"] = args.compile_mode
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    trainer = Trainer(preset(args.preset, **overrides))
    cuda, batch = trainer.cuda, trainer.config.batch_size
    if args.dali_stream_priority is not None:
        if not hasattr(trainer.train_loader, "stream_priority"):
            ap.error(f"--dali-stream-priority needs the DALI loader, not {type(trainer.train_loader).__name__}")
        trainer.train_loader.stream_priority = args.dali_stream_priority
    real = batches(trainer.train_loader)
    fixed = tuple(v.clone() for v in next(real))

    def real_step():
        trainer.train_step(next(real))

    def synthetic_step():
        trainer.train_step(fixed)

    def loader_step():
        next(real)

    started = time.perf_counter()
    timed(real_step, 1, cuda)
    first = time.perf_counter() - started
    timed(real_step, args.warmup, cuda)
    timed(synthetic_step, args.warmup, cuda)
    rates: dict[str, list[float]] = {"real": [], "synthetic": [], "loader": []}
    for _ in range(args.rounds):
        for name, step in (("real", real_step), ("synthetic", synthetic_step), ("loader", loader_step)):
            rates[name].append(args.steps * batch / timed(step, args.steps, cuda))
    real_rate, synth_rate = (statistics.median(rates[k]) for k in ("real", "synthetic"))
    device = torch.cuda.get_device_name() if cuda else "cpu"
    c = trainer.config
    print(f"# {args.preset}: {c.method}+{c.smoothing} {c.arch}, batch {batch}, {trainer.data_info}, "
          f"{len(trainer.train_loader)} steps per epoch")
    if args.dali_stream_priority is not None:
        print(f"# DALI stream priority {args.dali_stream_priority}")
    print(f"# {device}, compiled={trainer.compiled} ({c.compile_mode}), first step (compile) {first:.1f} s, "
          f"{args.rounds} x {args.steps} steps per path")
    print("| path | img/s (median) | blocks |\n|---|---|---|")
    for name in ("real", "synthetic", "loader"):
        print(f"| {name} | {statistics.median(rates[name]):,.0f} | {', '.join(f'{r:,.0f}' for r in rates[name])} |")
    print(f"\nreal / synthetic = {real_rate / synth_rate:.3f}")
    if args.profile:
        for name, step in (("synthetic", synthetic_step), ("real", real_step)):
            profile(name, step, args.profile, cuda)


if __name__ == "__main__":
    main()
