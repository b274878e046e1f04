"""Linear-evaluation step throughput (the standard protocols): the frozen backbone's forward on the real
training loader against the same step on a fixed batch already on the device, measured in one run.

    python benchmarks/linear_step.py --data <ImageNet-layout tree> [--protocol byol] [--loader dali]
        [--steps 200 --rounds 3 --warmup 20] [--hw-decoder-load 0.9] [--decode shared|fused]
        [--decoder cpu] [--cpu-share 0.3] [--threads N] [--stream default]

A step is `eval.linear.train_head` over `eval.linear.frozen_features`, as `eval-linear` runs it: the
backbone (ResNet-50, random weights: speed does not depend on them; eval mode, bf16 autocast,
channels_last on CUDA) computes features of the protocol's training view (RandomResizedCrop + flip at
224 px for ImageNet-sized images), then the head (BatchNorm1d + Linear for byol) takes one SGD step.
`real` draws batches from the protocol's training loader, `synthetic` reuses one batch, `loader` only
draws batches. The real path starts so that its first timed block crosses an epoch end. img/s per
block is steps x batch / wall time between CUDA synchronisations; the table gives the medians.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import os
import statistics
import subprocess
import sys
import time
from datetime import date
from importlib.util import find_spec
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if find_spec("fastse") is None or find_spec("fastse.pipelines") is None:  # the checkout's fastse/ alone: no pipelines/
    sys.exit("fastse is not installed: pip install -e . first (in the checkout; make setup does it)")
from fastse.pipelines.loader import consumer_stream  # noqa: E402
from steptime import timed  # noqa: E402  (benchmarks/steptime.py)

from fastse.eval.linear import _frozen, eval_data, frozen_features, get_protocol, make_head, train_head  # noqa: E402
from fastse.models.resnet import ARCHS, resnet_backbone  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="a tree with train/ and val/ (or test/) class folders")
    ap.add_argument("--protocol", default="byol", choices=("byol", "moco"))
    ap.add_argument("--arch", default="resnet50", choices=ARCHS)
    ap.add_argument("--loader", default="dali", choices=("auto", "tensor", "dali"))
    ap.add_argument("--batch-size", type=int, default=None, help="default: the protocol's (256)")
    ap.add_argument("--hw-decoder-load", type=float, default=None, help="DALI: share of JPEGs for the hardware decoder")
    ap.add_argument("--stream", default="priority", choices=("priority", "default"),
                    help="the step on a high-priority CUDA stream (as eval-linear runs it) or the default one")
    ap.add_argument("--decode", choices=("shared", "fused"), default=None,
                    help="DALI: decode whole images, or just the crop window (the default for one view)")
    ap.add_argument("--decoder", choices=("auto", "gpu", "cpu"), default="auto",
                    help="DALI: decode with nvJPEG, or on DALI's CPU threads and augment on the GPU "
                         "(auto: the loader's choice, nvJPEG for one view)")
    ap.add_argument("--cpu-share", type=float, default=None,
                    help="DALI: the share of each batch's JPEGs decoded on the CPU threads, the rest on nvJPEG")
    ap.add_argument("--threads", type=int, default=None, help="DALI CPU threads (default: by the decoder)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--limit", type=int, default=None, help="at most N images of each split (CPU smoke runs)")
    args = ap.parse_args()
    device, cuda = torch.device(args.device), torch.device(args.device).type == "cuda"
    data = eval_data(args.data, limit=args.limit)
    protocol = get_protocol(args.protocol, small=data.small, batch_size=args.batch_size)
    bs = protocol.batch_size
    loader = data.loader("train", "train", batch_size=bs, device=device, backend=args.loader, drop_last=True)
    if args.hw_decoder_load is not None:  # both read when the pipeline is built, on first use
        loader.hw_decoder_load = args.hw_decoder_load
    if args.decode:
        loader.fused_decode = args.decode == "fused"
    share = args.cpu_share  # the share of JPEGs decoded on the CPU threads; None: the loader's choice
    if share is None and args.decoder != "auto":
        share = float(args.decoder == "cpu")
    if share is not None and not 0 <= share <= 1:
        ap.error(f"--cpu-share {share} is outside [0, 1]")
    if share is not None and cuda:
        from fastse.pipelines.dali_backend import default_threads

        loader.cpu_decode = share
        loader.num_threads = default_threads(gpu=not loader.cpu_decode)
    if args.threads:
        loader.num_threads = args.threads
    backbone = _frozen(resnet_backbone(args.arch), device)
    with torch.no_grad():
        dim = backbone(torch.zeros(2, 3, data.size, data.size, device=device)).flatten(1).shape[1]
    head = make_head(dim, len(data.train.classes), batchnorm=protocol.batchnorm).to(device)

    start = max(0, len(loader) - 2 - args.warmup - args.steps // 2)  # the first timed block crosses an epoch end
    epoch_ends = 0

    def stream():
        nonlocal epoch_ends
        for epoch in itertools.count():
            loader.set_epoch(epoch, start_batch=start if epoch == 0 else 0)
            epoch_ends += epoch > 0
            yield from loader

    consumer = consumer_stream(loader, device) if args.stream == "priority" else contextlib.nullcontext()
    consumer.__enter__()  # as train_linear: the step on a high-priority stream beside DALI's
    real = stream()
    fixed = next(real)

    def run(batches, n):
        """`n` steps of train_head on `batches` (one 'epoch' of n steps at the protocol's learning rate)."""
        train_head(head, lambda _: itertools.islice(batches, n), n, dataclasses.replace(protocol, epochs=1))

    paths = {"real": lambda n: run(frozen_features(backbone, real, device), n),
             "synthetic": lambda n: run(frozen_features(backbone, itertools.repeat(fixed), device), n),
             "loader": lambda n: list(itertools.islice(real, n))}
    started = time.perf_counter()
    timed(lambda: paths["real"](1), 1, cuda)
    first = time.perf_counter() - started
    timed(lambda: paths["real"](args.warmup), 1, cuda)
    timed(lambda: paths["synthetic"](args.warmup), 1, cuda)
    rates: dict[str, list[float]] = {k: [] for k in paths}
    ends = 0
    for _ in range(args.rounds):
        for name, path in paths.items():
            before = epoch_ends
            rates[name].append(args.steps * bs / timed(lambda: path(args.steps), 1, cuda))
            ends += (epoch_ends - before) if name == "real" else 0
    real_rate, synth_rate = (statistics.median(rates[k]) for k in ("real", "synthetic"))
    commit = os.environ.get("FASTSE_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"], text=True,
                                                               capture_output=True, cwd=REPO).stdout.strip()
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"# {date.today()}, {name}, commit {commit or '?'}, torch {torch.__version__}")
    print(f"# linear protocol {protocol.name}: {args.arch} frozen, batch {bs}, {data.num('train'):,} train images at "
          f"{data.size} px, {type(loader).__name__} ({getattr(loader, 'num_threads', '-')} threads), {len(loader)} "
          f"steps per epoch; first step {first:.1f} s; {args.rounds} x {args.steps} steps per path, median block")
    print("| path | img/s (median) | blocks |\n|---|---|---|")
    for key, values in rates.items():
        print(f"| {key} | {statistics.median(values):,.0f} | {', '.join(f'{r:,.0f}' for r in values)} |")
    print(f"\nreal / synthetic = **{real_rate / synth_rate:.3f}**; epoch ends in the timed real blocks: {ends}")


if __name__ == "__main__":
    main()
