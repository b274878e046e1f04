"""Mixed precision: the autocast context the training loops, the evaluations and the command line share."""

from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device, dtype: torch.dtype | None = torch.bfloat16) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` (bf16) on a CUDA `device`; on another device, or with `dtype` None (full
    precision), a context that does nothing."""
    if dtype is None or torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)
