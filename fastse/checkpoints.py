"""Training checkpoints that are never lost or half-read: safetensors groups + JSON metadata, atomically.

A checkpoint is a folder `run_dir/checkpoints/step-{step:09d}/` holding one `{group}.safetensors` per
group of tensors ("student", "teacher", "optimizer", "queue", "rng", ...) and `meta.json`: the caller's
metadata (config, epoch, smoother state, optimizer layout) plus "format", "step", "files" (name ->
sha256), "fastse_version" and "time". It is written into a hidden temp folder beside it, every file
and the folder fsynced, then renamed into place and the parent fsynced: a crash at any moment leaves
either the whole checkpoint or none. `latest_checkpoint` verifies the checksums and falls back past
a torn or corrupt one. One process writes a run folder (rank 0 under DDP). `check_run_dir` tells,
before training starts, whether the run folder can be written and has room for a checkpoint.

Also: flat tensor encodings of optimizer and RNG states (safetensors holds tensors only, and nothing
here unpickles). `backbone.safetensors`, the export that loads into a plain torchvision ResNet (written
into best/ by the caller's `extra`), is `fastse.models.export`'s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import secrets
import shutil
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

import fastse
from fastse.atomic import fsync_dir as _fsync_dir
from fastse.atomic import write_synced as _write_synced
from fastse.tensorfiles import CheckpointError
from fastse.tensorfiles import cpu_tensors as _cpu_tensors

log = logging.getLogger(__name__)

FORMAT = "fastse-checkpoint/1"
META = "meta.json"
_STEP_DIR = re.compile(r"step-(\d{9,})")
_GROUP = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

__all__ = [
    "CheckpointError", "check_run_dir", "save_checkpoint", "save_best", "best_checkpoint", "latest_checkpoint",
    "load_checkpoint",
    "optimizer_to_tensors", "optimizer_from_tensors", "rng_state", "set_rng_state",
]


# ---------------------------------------------------------------------------------------- files


def _discard(folder: Path) -> None:
    """Remove a folder: first renamed out of sight (atomic), then deleted."""
    trash = folder.with_name(f".trash-{folder.name}-{secrets.token_hex(4)}")
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"checkpoint meta: a {type(obj).__name__} is not JSON-serialisable ({obj!r:.80})")


# ----------------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    run_dir: str | Path, step: int, groups: dict[str, dict[str, Tensor]], meta: dict, *, keep: int = 3
) -> Path:
    """Write `groups` (group -> name -> tensor; moved to CPU) and `meta` (JSON-able) as the checkpoint
    of `step`, atomically (see the module docstring), then keep the newest `keep` checkpoints. An
    existing checkpoint of the same step is replaced. Returns the checkpoint folder."""
    if keep < 1:
        raise ValueError(f"keep={keep}: at least the newest checkpoint must be kept")
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        _fsync_dir(folder.parent)
    final = folder / f"step-{step:09d}"
    tmp = _write_temp_checkpoint(folder, final.name, step, groups, meta)
    try:
        if final.exists():
            _discard(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(folder)
    _prune(folder, keep, final)
    return final


def _write_temp_checkpoint(folder: Path, name: str, step: int, groups: dict[str, dict[str, Tensor]], meta: dict,
                           extra: Callable[[Path], Any] | None = None) -> Path:
    """A complete checkpoint (the groups, `meta.json` with their checksums; `extra(tmp)` may add files)
    in a new hidden temp folder of `folder`, every file and the folder fsynced; its path."""
    for group in groups:
        if not _GROUP.fullmatch(group) or group == "meta":
            raise ValueError(f"checkpoint group name {group!r}: use letters, digits, '_', '-', '.' (not 'meta')")
    tmp = folder / f".tmp-{name}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        files = {}
        for group, tensors in groups.items():
            data = st_save(_cpu_tensors(group, tensors), metadata={"format": FORMAT, "group": group})
            _write_synced(tmp / f"{group}.safetensors", data)
            files[f"{group}.safetensors"] = hashlib.sha256(data).hexdigest()
        if extra is not None:
            extra(tmp)
        info = {**meta, "format": FORMAT, "step": step, "files": files, "fastse_version": fastse.__version__,
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        _write_synced(tmp / META, json.dumps(info, indent=1, default=_json_default).encode())
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


BEST = "best"  # the run folder's best checkpoint by the monitored metric, beside checkpoints/
_BEST_OLD = ".best-old"  # the previous best/ during a replacement


def save_best(run_dir: str | Path, step: int, groups: dict[str, dict[str, Tensor]], meta: dict, *,
              extra: Callable[[Path], Any] | None = None) -> Path:
    """Write a checkpoint like `save_checkpoint`'s (the same files, checksums and meta.json, whose "best"
    entry says by what metric and value) as `run_dir/best/`, replacing the previous best; `extra(folder)`,
    when given, writes more files into the new folder before it moves in (the engine's: the teacher's
    `backbone.safetensors`, for `fastse knn` / `eval-linear`). Not counted among the last `keep`
    checkpoints, never pruned. The new folder is complete before the old one
    moves aside (to `.best-old`) and it moves in; a crash between those two renames is undone by
    `best_checkpoint`, which moves the old one back."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _restore_best(run_dir)
    tmp = _write_temp_checkpoint(run_dir, BEST, step, groups, meta, extra)
    final, old = run_dir / BEST, run_dir / _BEST_OLD
    try:
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(run_dir)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _restore_best(run_dir: Path) -> None:
    if not (run_dir / BEST).exists() and (run_dir / _BEST_OLD).is_dir():
        os.rename(run_dir / _BEST_OLD, run_dir / BEST)


def best_checkpoint(run_dir: str | Path) -> tuple[Path, dict] | None:
    """(folder, meta) of the run folder's `best/` checkpoint, its files' checksums verified, or None
    where there is none (or it is damaged: a warning)."""
    run_dir = Path(run_dir)
    try:
        _restore_best(run_dir)
        path = run_dir / BEST
        if not path.is_dir():
            return None
        meta = _read_meta(path)
        for name, digest in meta["files"].items():
            _read_verified(path / name, digest)
        return path, meta
    except (CheckpointError, OSError) as e:
        log.warning("ignoring the best checkpoint of %s: %s", run_dir, e)
        return None


def check_run_dir(run_dir: str | Path, checkpoint_bytes: int, *, keep: int = 1, best: bool = False) -> None:
    """Fail fast, before any training, where checkpoints of about `checkpoint_bytes` each could not be
    written to `run_dir`: CheckpointError (naming the folder) unless it can be created and a file
    written into it (a probe, fsynced and removed) and its file system has room for one checkpoint;
    a warning where fewer than a long run needs at once fit: `keep` + 1 (the newest is written before the
    oldest is removed) and, with `best` (a best/ checkpoint by a monitored metric, `save_best`), one more:
    best/ beside the last `keep`, or while best/ is replaced, the old and the new beside them. Checkpoints
    already there (the last `keep`, best/) count."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            _write_synced(probe, b"fastse")
        finally:
            probe.unlink(missing_ok=True)
    except OSError as e:
        raise CheckpointError(f"{run_dir}: the run folder cannot be written ({e.strerror or e})") from None
    free, mib = shutil.disk_usage(run_dir).free, 1 << 20
    if free < checkpoint_bytes:
        raise CheckpointError(f"{run_dir}: {free / mib:,.0f} MiB free on its disk, but one checkpoint needs about "
                              f"{checkpoint_bytes / mib:,.0f} MiB")
    have = min(len(_step_dirs(run_dir / "checkpoints")), keep) + int(best and (run_dir / BEST).is_dir())
    needed = keep + 1 + int(best) - have
    if free < needed * checkpoint_bytes:
        log.warning("%s: %.0f MiB free holds %d checkpoints of about %.0f MiB; keeping %d%s needs %d more",
                    run_dir, free / mib, free // checkpoint_bytes, checkpoint_bytes / mib, keep,
                    " and best/" if best else "", needed)


def _step_dirs(folder: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `step-*` folder, newest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def _prune(folder: Path, keep: int, current: Path) -> None:
    """Remove all but the newest `keep` checkpoints (never `current`) and temp folders left by crashes."""
    for _, path in _step_dirs(folder)[keep:]:
        if path != current:
            _discard(path)
    for path in folder.iterdir():
        if path.name.startswith((".tmp-", ".trash-")) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)  # one writer per run folder: none of these is live


def _read_meta(path: Path) -> dict:
    """The parsed meta.json of the checkpoint folder `path`, its listed files present; else CheckpointError."""
    if not path.is_dir():
        what = "is not a checkpoint folder" if path.exists() else "does not exist"
        raise CheckpointError(f"{path}: {what}")
    meta_path = path / META
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: no {META}; not a complete fastse checkpoint")
    try:
        meta = json.loads(meta_path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("files"), dict):
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint (format {found!r})")
    for name in meta["files"]:
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: listed in {META} but missing")
    return meta


def _read_verified(file: Path, digest: str) -> bytes:
    data = file.read_bytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(f"{file}: sha256 does not match {META} (the file is truncated or corrupt)")
    return data


def latest_checkpoint(run_dir: str | Path, *, verify: bool = True) -> Path | None:
    """The newest complete checkpoint folder of `run_dir` (None when it has none). With `verify`
    (default), every file's sha256 is checked; a torn or corrupt checkpoint is skipped with a
    warning, falling back to the one before."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: run folder {'is not a folder' if run_dir.exists() else 'does not exist'}")
    for _, path in _step_dirs(run_dir / "checkpoints"):
        try:
            meta = _read_meta(path)
            if verify:
                for name, digest in meta["files"].items():
                    _read_verified(path / name, digest)
            return path
        except (CheckpointError, OSError) as e:
            log.warning("skipping checkpoint %s: %s", path, e)
    return None


def load_checkpoint(
    path: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[dict[str, dict[str, Tensor]], dict]:
    """(groups, meta) of the checkpoint folder `path`, tensors on `device`, checksums verified."""
    path = Path(path)
    meta = _read_meta(path)
    groups = {}
    for name, digest in meta["files"].items():
        data = _read_verified(path / name, digest)
        try:
            tensors = st_load(data)
        except Exception as e:  # safetensors raises its own error types for malformed headers
            raise CheckpointError(f"{path / name}: not a readable safetensors file ({e})") from None
        groups[name.removesuffix(".safetensors")] = {k: v.to(device) for k, v in tensors.items()}
    return groups, meta


# ------------------------------------------------------------------------------ flat encodings


def _encode(obj: Any, name: str, tensors: dict[str, Tensor]) -> Any:
    """A JSON-able mirror of `obj`: tensors moved into `tensors` under dotted names, tuples and
    dicts with non-string keys tagged so `_decode` rebuilds them exactly."""
    join = lambda k: f"{name}.{k}" if name else str(k)
    if isinstance(obj, Tensor):
        tensors[name] = obj
        return {"__tensor__": name}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, join(i), tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, join(i), tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, join(k), tensors) for k, v in obj.items()}
        return {"__items__": [[k, _encode(v, join(k), tensors)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{name}: cannot encode a {type(obj).__name__}")


def _decode(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """`opt.state_dict()` as (flat name -> tensor dict for a checkpoint group, JSON-able layout for
    meta): per-parameter state tensors ("state.{i}.{key}", e.g. momentum buffers, Adam's step) go
    to the dict; hyperparameters, non-tensor state and the structure to the layout."""
    tensors: dict[str, Tensor] = {}
    layout = _encode(opt.state_dict(), "", tensors)
    return tensors, layout


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], layout: dict) -> None:
    """Restore `opt` (built over the same parameters) from `optimizer_to_tensors`' output, exactly. State
    tensors shaped like their parameter take its memory layout too (a channels_last weight gets a
    channels_last momentum buffer), as fused and foreach kernels require; the file holds them contiguous."""
    missing = sorted(_tensor_names(layout) - set(tensors))
    if missing:
        raise CheckpointError(f"optimizer state: tensors {missing[:5]} are in the layout but not in the group")
    opt.load_state_dict(_decode(layout, tensors))
    for param, state in opt.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def _tensor_names(obj: Any) -> set[str]:
    if isinstance(obj, list):
        return set().union(*map(_tensor_names, obj)) if obj else set()
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return {obj["__tensor__"]}
        return _tensor_names(list(obj.values()))
    return set()


def rng_state() -> dict[str, Tensor]:
    """This process's global RNG states as tensors, for a checkpoint group (e.g. groups["rng"]):
    "torch" (CPU generator, uint8), "cuda.{i}" (every visible CUDA device, uint8), "numpy.*" (the
    legacy global MT19937: key int64 [624], [pos, has_gauss] int64, gauss float64) and "python.*"
    (`random`: version and MT state int64 [626], [has_gauss, gauss] float64). No pickling."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    _, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state["numpy.key"] = torch.from_numpy(key.astype(np.int64))
    state["numpy.pos"] = torch.tensor([pos, has_gauss], dtype=torch.int64)
    state["numpy.gauss"] = torch.tensor([gauss], dtype=torch.float64)
    version, mt, gauss_next = random.getstate()
    state["python.state"] = torch.tensor([version, *mt], dtype=torch.int64)
    state["python.gauss"] = torch.tensor([gauss_next is not None, gauss_next or 0.0], dtype=torch.float64)
    return state


def set_rng_state(state: dict[str, Tensor]) -> None:
    """Restore what `rng_state` returned (on any device, e.g. as `load_checkpoint(device="cuda")` put
    it): the next draws of torch, CUDA, numpy and `random` repeat."""
    state = {k: v.cpu() for k, v in state.items()}
    torch.set_rng_state(state["torch"].to(torch.uint8))
    cuda = sorted((int(k.split(".")[1]), v) for k, v in state.items() if k.startswith("cuda."))
    if cuda:
        if not torch.cuda.is_available():
            log.warning("the checkpoint holds CUDA RNG states, but CUDA is not available: not restored")
        else:
            if len(cuda) != torch.cuda.device_count():
                log.warning("CUDA RNG states of %d devices, %d visible", len(cuda), torch.cuda.device_count())
            for i, s in cuda[: torch.cuda.device_count()]:
                torch.cuda.set_rng_state(s.to(torch.uint8), i)
    pos, has_gauss = state["numpy.pos"].tolist()
    np.random.set_state(("MT19937", state["numpy.key"].numpy().astype(np.uint32), pos, has_gauss,
                         float(state["numpy.gauss"][0])))
    version, *mt = state["python.state"].tolist()
    has, gauss = state["python.gauss"].tolist()
    random.setstate((version, tuple(mt), gauss if has else None))
