"""Pretraining step throughput: the real input pipeline against the same compiled step on a fixed
batch already on the GPU (what the loader must not slow down), measured in one run.

    python benchmarks/pretrain_step.py --preset byol-cifar10 --data <CIFAR-10 JPEG tree> [--steps 300]
    python benchmarks/pretrain_step.py --preset byol-cifar10 --data <tree> --compile-mode default
    python benchmarks/pretrain_step.py --preset byol-imagenet --data <ImageNet-layout tree> --loader dali \\
        [--variant name:hw=0.9,threads=12,decode=fused,step=default ...]
    python benchmarks/pretrain_step.py --preset byol-imagenet --photo-jpegs 4000 --loader dali

Builds a `Trainer` (model, optimizer, smoother, compile, bf16 as the preset says), warms the paths
up, then times `--rounds` alternating blocks of `--steps` steps: `real` draws each batch from the
training loader (augmentation included), `synthetic` reuses one batch of the same shape and dtype (and
its labels). Both do what the trainer's loop does each step, on the stream the trainer trains on
(`Trainer.step_stream`): `Trainer.train_step` (forward, backward, optimizer, teacher update), then
`Trainer.probe_step` (the online linear probe on the teacher features the step kept; on where the tree
has labels and a test/ or val/ split, as in training). A third path, `no probe`, is `synthetic` with the
probe off (no features kept, no probe step: training with --no-online-probe), so the table gives the
probe's cost, 1 - synthetic / no probe (the share of the step's time the probe takes; "-" where the probe
is off); a fourth, `loader`, only draws batches (no model: the pipeline's own rate in the same process,
its headroom over the step). img/s per block is steps x batch / wall time between CUDA synchronisations;
the table gives the median of the blocks and real / synthetic. The real path starts `--warmup` +
`--steps` / 2 batches before the end of an epoch, so its first timed block crosses an epoch end (a new
epoch reshuffles); the table says how many epoch ends the timed real blocks crossed.

With the DALI loader, each `--variant` (repeatable) times the same compiled step with the loader built
again with other options: `hw=` share of JPEGs for the hardware decoder, `threads=` DALI CPU threads,
`decode=shared|fused`, `decoder=gpu|cpu` (nvJPEG, or DALI's CPU threads with only the augmentation
on the GPU), `cpu=` the share of each batch's JPEGs decoded on the CPU threads (the rest on nvJPEG),
`dali_priority=` CUDA priority of DALI's streams, `step=default` to train on the default
stream instead of the trainer's high-priority one. The first variant is the loader as the
trainer builds it unless named otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from importlib.util import find_spec
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if find_spec("fastse") is None or find_spec("fastse.pipelines") is None:  # the checkout's fastse/ alone: no pipelines/
    sys.exit("fastse is not installed: pip install -e . first (in the checkout; make setup does it)")
from steptime import profile, timed  # noqa: E402  (benchmarks/steptime.py)

from fastse.pretrain.config import COMPILE_MODES, PRESETS, preset  # noqa: E402
from fastse.pretrain.trainer import Trainer  # noqa: E402

VARIANT_KEYS = {"hw": float, "threads": int, "decode": str, "decoder": str, "cpu": float, "dali_priority": int,
                "step": str}


def parse_variant(text: str) -> tuple[str, dict]:
    """"name:key=value,..." -> (name, options); "default" alone is the trainer's own loader."""
    name, _, body = text.partition(":")
    options = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        if key not in VARIANT_KEYS or not value:
            raise argparse.ArgumentTypeError(f"variant {text!r}: {item!r} is not one of "
                                             f"{', '.join(k + '=' for k in VARIANT_KEYS)}")
        options[key] = VARIANT_KEYS[key](value)
    if (options.get("decode", "shared") not in ("shared", "fused") or options.get("step", "trainer") not in (
            "trainer", "default") or options.get("decoder", "gpu") not in ("gpu", "cpu")):
        raise argparse.ArgumentTypeError(f"variant {text!r}: decode=shared|fused, decoder=gpu|cpu, "
                                         "step=trainer|default")
    return name, options


def variant_loader(loader, options: dict):
    """`loader` (a DaliLoader) built again with the variant's options; the same data, seed and shard."""
    from fastse.pipelines.dali_backend import DaliLoader

    if not options.keys() - {"step"}:
        return loader
    if not isinstance(loader, DaliLoader):
        raise SystemExit(f"loader variants need the DALI loader, not {type(loader).__name__} (--loader dali)")
    decode = options.get("decode")
    return DaliLoader(
        loader.files, loader.labels, loader.recipe, batch_size=loader.batch_size, device=loader.device,
        seed=loader.seed, rank=loader.rank, world_size=loader.world_size, dtype=loader.dtype,
        channels_last=loader.channels_last, drop_last=loader.drop_last, indices=loader.pool,
        num_threads=options.get("threads"), fused_decode=None if decode is None else decode == "fused",
        stream_priority=options.get("dali_priority", loader.stream_priority),
        hw_decoder_load=options.get("hw", loader.hw_decoder_load), sizes=loader.sizes,
        cpu_decode=options.get("cpu", float(options["decoder"] == "cpu") if "decoder" in options
                               else loader.cpu_decode))


class Batches:
    """Endless (views, labels) batches from `loader`, epoch after epoch, from batch `start` of epoch 0;
    `epoch_ends` counts the epoch ends passed."""

    def __init__(self, loader, start: int):
        self.loader, self.start, self.epoch_ends = loader, start, 0
        self._it = self._batches()

    def _batches(self):
        for epoch in itertools.count():
            self.loader.set_epoch(epoch, start_batch=self.start if epoch == 0 else 0)
            if epoch:
                self.epoch_ends += 1
            yield from self.loader

    def __next__(self):
        return next(self._it)


def training_step(trainer: Trainer, batch: tuple, probe: bool = True) -> None:
    """What `Trainer.fit` does with one (views, labels) batch: `train_step`, then `probe_step` (a no-op
    where the probe is off). `probe=False`: the step with the probe off (no teacher features kept)."""
    views, labels = batch
    trainer.method.want_features(probe and trainer.probe_on)
    trainer.train_step(views)
    if probe:
        trainer.probe_step(labels)


def scan_rate(data: str) -> str:
    """How long the pre-training scan of the train split takes (headers and end markers of every file)."""
    from fastse.pipelines.datasets import resolve_data, scan_image_folder

    root = resolve_data(data)
    started = time.perf_counter()
    index = scan_image_folder(root, split="train" if (root / "train").is_dir() else None)
    seconds = time.perf_counter() - started
    return f"scan of {len(index):,} files before training: {seconds:.1f} s ({len(index) / seconds:,.0f} files/s)"


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
    ap.add_argument("--variant", action="append", type=parse_variant, default=None, metavar="NAME:K=V,...",
                    help="a DALI loader variant to time (repeatable); see the module docstring")
    ap.add_argument("--steps", type=int, default=300, help="steps per timed block")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of alternating blocks, one of each path")
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--limit", type=int, default=None, help="at most N images (CPU smoke runs)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="then profile N steps of the real and synthetic paths of the first variant: GPU busy time "
                         "per step against wall time per step (GPU-bound when they match, host-bound when the GPU "
                         "idles), top operators")
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

    scanned = scan_rate(args.data) if args.loader == "dali" else None
    overrides = dict(data=args.data, loader=args.loader, device=args.device, wandb="disabled", knn_every=0,
                     limit=args.limit, out=tempfile.mkdtemp(prefix="fastse-bench-"))
    if args.compile_mode:
        overrides["compile_mode"] = args.compile_mode
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    trainer = Trainer(preset(args.preset, **overrides))
    cuda, batch, own = trainer.cuda, trainer.config.batch_size, trainer.train_loader
    c = trainer.config
    device = torch.cuda.get_device_name() if cuda else "cpu"
    commit = os.environ.get("FASTSE_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"], text=True,
                                                               capture_output=True, cwd=REPO).stdout.strip()
    print(f"# {date.today()}, {device}, commit {commit or '?'}, torch {torch.__version__}")
    print(f"# {args.preset}: {c.method}+{c.smoothing} {c.arch}, batch {batch}, {trainer.data_info}, "
          f"{len(own)} steps per epoch; compile={trainer.compiled} ({c.compile_mode})")
    if scanned:
        print(f"# {scanned}")
    if not trainer.probe_on:
        print("# online probe off (see above): real and synthetic without it, no probe cost")
    print("| variant | options | DALI threads | real img/s | synthetic img/s | no probe img/s | probe cost "
          "| loader img/s | real / synthetic | epoch ends in real blocks |\n|---|---|---|---|---|---|---|---|---|---|",
          flush=True)
    rows, first_compile = [], None
    for k, (name, options) in enumerate(args.variant or [("default", {})]):
        loader = variant_loader(own, options)
        trainer.train_loader = loader  # the trainer's step stream follows its loader
        on_stream = trainer.step_stream if options.get("step", "trainer") == "trainer" else contextlib.nullcontext
        real = Batches(loader, start=max(0, len(loader) - 2 - args.warmup - args.steps // 2))  # 2: fixed, first
        with on_stream():
            views, labels = next(real)
            fixed = (tuple(v.clone() for v in views), labels.clone())
            paths = {"real": lambda: training_step(trainer, next(real)),
                     "synthetic": lambda: training_step(trainer, fixed),
                     "no probe": lambda: training_step(trainer, fixed, probe=False), "loader": lambda: next(real)}
            if not trainer.probe_on:  # the same step as synthetic's
                del paths["no probe"]
            started = time.perf_counter()
            timed(paths["real"], 1, cuda)
            first_compile = first_compile or time.perf_counter() - started
            timed(paths["real"], args.warmup, cuda)
            for path in ("synthetic", "no probe"):  # the teacher without features: a graph of its own
                if path in paths:
                    timed(paths[path], args.warmup, cuda)
            rates: dict[str, list[float]] = {k: [] for k in paths}
            ends = 0
            for _ in range(args.rounds):
                for path, step in paths.items():
                    before = real.epoch_ends
                    rates[path].append(args.steps * batch / timed(step, args.steps, cuda))
                    ends += (real.epoch_ends - before) if path == "real" else 0
            if args.profile and k == 0:  # after the table row: printed below it
                profiled = [(path, paths[path]) for path in ("synthetic", "real")]
        real_rate, synth_rate, loader_rate = (statistics.median(rates[p]) for p in ("real", "synthetic", "loader"))
        bare, cost = "-", "-"
        if "no probe" in rates:
            bare_rate = statistics.median(rates["no probe"])
            bare, cost = f"{bare_rate:,.0f}", f"**{100 * (1 - synth_rate / bare_rate):.1f} %**"
        text = ",".join(f"{key}={v}" for key, v in options.items()) or "-"
        print(f"| {name} | {text} | {getattr(loader, 'num_threads', None) or '-'} | {real_rate:,.0f} | "
              f"{synth_rate:,.0f} | {bare} | {cost} | {loader_rate:,.0f} | **{real_rate / synth_rate:.3f}** | {ends} |",
              flush=True)
        rows.append((name, rates))
        if args.profile and k == 0:
            with on_stream():
                for path, step in profiled:
                    profile(f"{path} ({name})", step, args.profile, cuda)
        if loader is not own:
            loader.close()

    print(f"\n# first step (compile) {first_compile:.1f} s; {args.rounds} x {args.steps} steps per path and variant; "
          f"the median block")
    for name, rates in rows:
        print(f"# {name} blocks: " + "; ".join(f"{k} " + ", ".join(f"{r:,.0f}" for r in v) for k, v in rates.items()))
    trainer.close()


if __name__ == "__main__":
    main()
