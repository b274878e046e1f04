"""FixMatch step throughput: the real input pipeline against the same compiled step on a fixed batch already
on the GPU (what the loader must not slow down), measured in one run.

    python benchmarks/semi_step.py --data <CIFAR-10 JPEG tree> [--preset fixmatch-cifar10] [--steps 300]

Builds a `SemiTrainer` (WRN, optimizer, smoother, compile, bf16 as the preset says), warms every path
up, then times `--rounds` alternating blocks of `--steps` steps of `SemiTrainer.train_step` (one forward
of labeled + weak + strong images, backward, SGD, teacher update): `real` draws each step's batches from
the training streams as `fit` does (the next batch augmented on a side CUDA stream), `real-inline` draws
them on the training stream, `synthetic` reuses one batch of the same shapes and dtype. steps/s per
block is steps / wall time between CUDA synchronisations; the table gives the median of the blocks and
each path against synthetic.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from importlib.util import find_spec

import torch

if find_spec("fastse") is None or find_spec("fastse.pipelines") is None:  # the checkout's fastse/ alone: no pipelines/
    sys.exit("fastse is not installed: pip install -e . first (in the checkout; make setup does it)")
from steptime import profile, timed  # noqa: E402  (benchmarks/steptime.py)

from fastse.semi.config import PRESETS, preset  # noqa: E402
from fastse.semi.trainer import SemiTrainer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="fixmatch-cifar10")
    ap.add_argument("--data", required=True)
    ap.add_argument("--smoothing", default="sts", choices=("ema", "se", "sts"))
    ap.add_argument("--teacher-targets", action="store_true")
    ap.add_argument("--steps", type=int, default=300, help="steps per timed block")
    ap.add_argument("--rounds", type=int, default=3, help="alternating blocks per path")
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--depth", type=int, default=None, help="smaller WRNs and batches for CPU smoke runs")
    ap.add_argument("--widen", type=int, default=None)
    ap.add_argument("--labeled-batch", type=int, default=None)
    ap.add_argument("--num-labels", type=int, default=None)
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="then profile N steps of each path (GPU busy vs wall time per step, top operators)")
    args = ap.parse_args()

    overrides = dict(data=args.data, device=args.device, wandb="disabled", smoothing=args.smoothing,
                     teacher_targets=args.teacher_targets, out=tempfile.mkdtemp(prefix="fastse-bench-"))
    for key in ("depth", "widen", "labeled_batch", "num_labels"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    trainer = SemiTrainer(preset(args.preset, **overrides))
    cuda, c = trainer.cuda, trainer.config
    real, inline = trainer.data.batches(0), trainer.data.batches(0, prefetch=False)
    fixed = tuple(t.clone() for t in next(inline))
    paths = {"real": lambda: trainer.train_step(next(real)),
             "real-inline": lambda: trainer.train_step(next(inline)),
             "synthetic": lambda: trainer.train_step(fixed)}

    started = time.perf_counter()
    timed(paths["real"], 1, cuda)
    first = time.perf_counter() - started
    for step in paths.values():
        timed(step, args.warmup, cuda)
    rates: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, step in paths.items():
            rates[name].append(args.steps / timed(step, args.steps, cuda))
    median = {name: statistics.median(r) for name, r in rates.items()}
    device = torch.cuda.get_device_name() if cuda else "cpu"
    images = c.labeled_batch + 2 * c.unlabeled_batch
    print(f"# {args.preset}: fixmatch+{c.smoothing} WRN-{c.depth}-{c.widen}, {c.labeled_batch} labeled + "
          f"{c.unlabeled_batch} unlabeled a step ({images} images a forward), teacher_targets={c.teacher_targets}")
    print(f"# {device}, compiled={trainer.compiled}, dtype={c.dtype if cuda else 'fp32'}, first step (compile) "
          f"{first:.1f} s, {args.rounds} x {args.steps} steps per path; {trainer.data.summary}")
    print("| path | steps/s (median) | img/s | blocks | / synthetic |\n|---|---|---|---|---|")
    for name, r in rates.items():
        print(f"| {name} | {median[name]:.2f} | {median[name] * images:,.0f} | {', '.join(f'{x:.2f}' for x in r)} | "
              f"{median[name] / median['synthetic']:.3f} |")
    print(f"\nreal / synthetic = {median['real'] / median['synthetic']:.3f}")
    for name, step in paths.items() if args.profile else ():
        profile(name, step, args.profile, cuda)


if __name__ == "__main__":
    main()
