"""Run folders shared by the training loops: the checkpoint a run resumes from, the settings that
changed since it was saved, and deterministic kernels for bit-identical resumption."""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch

from fastse import checkpoints as ckpt


def find_checkpoint(out: Path, resume: bool, say: Callable[[str], None] = print) -> tuple[Path, dict] | None:
    """(path, meta) of the newest checkpoint in the run folder `out` to resume from, or None for a fresh
    start. Refuses (CheckpointError) to start afresh over another run's checkpoints without `resume`."""
    latest = ckpt.latest_checkpoint(out) if out.is_dir() else None
    if latest is None:
        if resume:
            say(f"--resume: no checkpoint in {out}, starting from scratch")
        return None
    if not resume:
        raise ckpt.CheckpointError(f"{out} already holds checkpoints ({latest.name}): "
                                   "resume it (--resume) or choose another output folder")
    return latest, json.loads((latest / ckpt.META).read_text())


def changed_fields(saved: dict[str, Any], now: dict[str, Any], resumable: Collection[str] = ()) -> str:
    """`field old -> new, ...` for the settings that differ between a checkpoint's config and this run's,
    leaving out the `resumable` ones (paths, logging, stopping step: what does not change the training)."""
    return ", ".join(f"{k} {saved.get(k)!r} -> {v!r}" for k, v in now.items()
                     if k not in resumable and saved.get(k) != v)


def set_determinism(on: bool, cuda: bool) -> None:
    """Deterministic kernels (and no cuDNN autotuning or TF32) when `on`; the fast defaults otherwise."""
    torch.use_deterministic_algorithms(on, warn_only=True)
    if cuda:
        torch.backends.cudnn.benchmark = not on
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not on
