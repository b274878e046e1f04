"""Teacher-update speed: fastse's EMA/SE/STS kernels against three baselines and the memory floor.

    python benchmarks/teacher_update.py [--iters 100] [--models resnet50_byol,wrn_28_2] [--kernels triton,torch]
                                        [--json out.json]

--kernels torch times only fastse's portable torch path (what runs where Triton is missing: CPUs, CUDA
without the triton package) on this GPU, next to the three baselines, even where Triton is available.

Per model (fp32 parameters on one GPU) and implementation, two numbers from CUDA events, median of
--iters single updates:
  gpu_ms   the update's GPU time: a 2 ms sleep kernel is queued first, so host launch cost is hidden
           (what a training loop whose host runs ahead pays);
  sync_ms  from a synchronised start: host launch latency included;
  loop_ms  --iters updates issued back to back, total time / iters: what a training loop pays per
           update (the host-bound authors' loop pays its Python time here, 1.44 ms on the reference page).
Speed-ups against the authors' loop are given for gpu_ms and loop_ms.
floor_ms = bytes the update must move / copy bandwidth measured in this run (a device-to-device copy,
bytes read + written). EMA and channel/element granularity move 3 x 4 B per parameter (read teacher and
student, write teacher); tensor granularity counts only the tensors it updates (mean over the timed steps).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import date
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch

if find_spec("fastse") is None or find_spec("fastse.pipelines") is None:  # the checkout's fastse/ alone: no pipelines/
    sys.exit("fastse is not installed: pip install -e . first (in the checkout; make setup does it)")
from fastse import philox  # noqa: E402
from fastse.models import byol_projector, resnet_backbone, wrn_28_2  # noqa: E402
from fastse.smoothing import Smoother, make_teacher  # noqa: E402


def build(name: str, device: str) -> torch.nn.Module:
    if name == "resnet50_byol":
        net = torch.nn.Sequential(resnet_backbone("resnet50"), byol_projector(2048, 4096, 256))
    elif name == "wrn_28_2":
        net = wrn_28_2(10)
    else:
        raise SystemExit(f"unknown model {name}")
    return net.to(device)


def time_it(fn, iters: int, warmup: int = 10) -> tuple[float, float, float, float]:
    """Median GPU ms (queue pre-filled), median ms from a synchronised start, median host ms, and
    loop ms: `iters` updates issued back to back, total / iters (a training loop's cost per update)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    gpu, sync, host = [], [], []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(2_000_000)  # ~1-2 ms of GPU work, so the launches below queue behind it
        a.record()
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e3)
        b.record()
        torch.cuda.synchronize()
        gpu.append(a.elapsed_time(b))
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        sync.append(a.elapsed_time(b))
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return statistics.median(gpu), statistics.median(sync), statistics.median(host), a.elapsed_time(b) / iters


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (median of 20 copies of 1 GiB)."""
    src = torch.empty(2**28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    gpu = time_it(lambda: dst.copy_(src), 20, 3)[0]
    return 2 * src.numel() * 4 / (gpu / 1e3)


def authors_loop(teacher, student, keep_prob, m, rng):
    """The released code's update: a Python loop, host RNG per tensor, non-in-place arithmetic."""
    for t, s in zip(teacher, student):
        if rng.random() < keep_prob:
            continue
        t.data = t.data * m + s.data * (1.0 - m)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--models", default="resnet50_byol,wrn_28_2")
    ap.add_argument("--keep-prob", type=float, default=0.7)
    ap.add_argument("--momentum", type=float, default=0.99)
    ap.add_argument("--kernels", default="triton,torch", help="fastse code paths to time")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    torch.backends.cudnn.benchmark = False
    bw = copy_bandwidth()
    gpu_name = torch.cuda.get_device_name()
    commit = os.environ.get("FASTSE_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# teacher update, {date.today()}, {gpu_name}, commit {commit or '?'}, torch {torch.__version__}")
    print(f"# copy bandwidth {bw / 1e12:.2f} TB/s (read + write); keep_prob {args.keep_prob}, momentum {args.momentum}")
    rows = []
    p, m = args.keep_prob, args.momentum
    for model_name in args.models.split(","):
        student = build(model_name, "cuda")
        teacher = make_teacher(student)
        sp, tp = list(student.parameters()), list(teacher.parameters())
        n_params = sum(x.numel() for x in sp)
        full_bytes = 3 * 4 * n_params
        print(f"\n## {model_name}: {len(sp)} tensors, {n_params / 1e6:.2f} M parameters, fp32; "
              f"full floor {full_bytes / bw * 1e3:.3f} ms")
        print(f"{'implementation':42s} {'gpu_ms':>7s} {'sync_ms':>7s} {'loop_ms':>7s} {'host_ms':>7s} {'floor_ms':>8s} "
              f"{'x floor':>7s} {'gpu vs authors':>14s} {'loop vs authors':>15s}")
        rng = np.random.default_rng(0)
        impls = [
            ("authors' loop (STS, tensor)", lambda: authors_loop(tp, sp, p, m, rng), full_bytes * (1 - p)),
            ("per-tensor lerp_ loop (EMA)", lambda: [t.lerp_(s, 1 - m) for t, s in zip(tp, sp)], full_bytes),
            ("one _foreach_lerp_ (EMA, timm ModelEmaV3)", lambda: torch._foreach_lerp_(tp, sp, 1 - m), full_bytes),
        ]
        for kernel in args.kernels.split(","):
            for rule in ("ema", "se", "sts"):
                for gran in ("tensor", "channel", "element"):
                    if rule == "ema" and gran != "tensor":
                        continue  # EMA has no fragments
                    sm = Smoother(student, teacher, rule=rule, keep_prob=p, momentum=m, granularity=gran, kernel=kernel)
                    if rule != "ema" and gran == "tensor":
                        sizes = torch.tensor([x.numel() for x in sp], dtype=torch.float64)
                        upd = [(philox.uniform(philox.step_key(0, k), 0, len(sp)) >= p).double() for k in range(200)]
                        floor = 3 * 4 * float(torch.stack([(u * sizes).sum() for u in upd]).mean())
                    else:
                        floor = full_bytes
                    label = f"fastse {kernel} {rule} {gran}" if rule != "ema" else f"fastse {kernel} ema"
                    impls.append((label, sm.step, floor))
        base = None
        for label, fn, floor_bytes in impls:
            gpu, sync, host, loop = time_it(fn, args.iters)
            base = base or (gpu, loop)
            floor_ms = floor_bytes / bw * 1e3
            row = {"model": model_name, "impl": label, "gpu_ms": gpu, "sync_ms": sync, "loop_ms": loop,
                   "host_ms": host, "floor_ms": floor_ms, "x_floor": gpu / floor_ms,
                   "gpu_speedup_vs_authors": base[0] / gpu, "loop_speedup_vs_authors": base[1] / loop}
            rows.append(row)
            print(f"{label:42s} {gpu:7.3f} {sync:7.3f} {loop:7.3f} {host:7.3f} {floor_ms:8.3f} {gpu / floor_ms:7.2f} "
                  f"{base[0] / gpu:13.1f}x {base[1] / loop:14.1f}x")
    if args.json:
        args.json.write_text(json.dumps({"gpu": gpu_name, "commit": commit, "date": str(date.today()),
                                         "copy_bandwidth": bw, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
