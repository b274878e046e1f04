"""Timing helpers of the step benchmarks (pretrain_step.py, semi_step.py): wall time of n steps between
CUDA synchronisations, and a profile that tells a host-bound step from a GPU-bound one."""

from __future__ import annotations

import time

import torch


def timed(step, n: int, cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        step()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def profile(name: str, step, n: int, cuda: bool) -> None:
    """Print wall ms/step, GPU kernel ms/step and the operators costing the most host and GPU time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        wall = timed(step, n, cuda)
    events = prof.key_averages()
    # kernels only, as the table's "Self CUDA time total": user annotations (torch.compile's "## Call
    # CompiledFxGraph" ranges) carry their kernels' time again and would count it twice
    gpu_us = sum(e.self_device_time_total for e in events
                 if e.device_type == DeviceType.CUDA and not e.is_user_annotation) if cuda else 0.0
    print(f"\n## profile of {n} {name} steps: wall {1e3 * wall / n:.2f} ms/step, GPU kernels "
          f"{gpu_us / 1e3 / n:.2f} ms/step ({100 * gpu_us / 1e6 / wall:.0f} % busy)")
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    if cuda:
        print(events.table(sort_by="self_device_time_total", row_limit=15))
