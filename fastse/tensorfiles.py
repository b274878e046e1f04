"""Files of tensors (safetensors), as training checkpoints (`fastse.checkpoints`) and the backbone export
(`fastse.models.export`) both write and read them: the error for a file that cannot be used, and tensors
made ready to be written. Imports only torch and the standard library."""

from __future__ import annotations

from torch import Tensor


class CheckpointError(ValueError):
    """A checkpoint, a backbone file or a run folder that cannot be used; the message names the path."""


def cpu_tensors(group: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached contiguous CPU tensors; ones sharing storage (tied weights, views) become copies."""
    out, seen = {}, set()
    for key, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"checkpoint group {group!r}: {key!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        elif t.numel():
            seen.add(ptr)
        out[key] = t
    return out
