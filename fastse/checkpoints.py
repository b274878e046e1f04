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
here unpickles), and `backbone.safetensors`, the export that loads into a plain torchvision ResNet,
with the sha256 of its tensor data in its header, verified on loading.
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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

import fastse
from fastse.atomic import fsync_dir as _fsync_dir

log = logging.getLogger(__name__)

FORMAT = "fastse-checkpoint/1"
BACKBONE_FORMAT = "fastse-backbone/1"
META = "meta.json"
_STEP_DIR = re.compile(r"step-(\d{9,})")
_GROUP = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

__all__ = [
    "CheckpointError", "check_run_dir", "save_checkpoint", "save_best", "best_checkpoint", "latest_checkpoint",
    "load_checkpoint",
    "optimizer_to_tensors", "optimizer_from_tensors", "rng_state", "set_rng_state", "export_backbone", "load_backbone",
]


class CheckpointError(ValueError):
    """A checkpoint or run folder that cannot be used; the message names the path."""


# ---------------------------------------------------------------------------------------- files


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _discard(folder: Path) -> None:
    """Remove a folder: first renamed out of sight (atomic), then deleted."""
    trash = folder.with_name(f".trash-{folder.name}-{secrets.token_hex(4)}")
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _cpu_tensors(group: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
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
                           extra: Any = None) -> Path:
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
              backbone: nn.Module | None = None) -> Path:
    """Write a checkpoint like `save_checkpoint`'s (the same files, checksums and meta.json, whose "best"
    entry says by what metric and value) as `run_dir/best/`, replacing the previous best, with the teacher's
    `backbone` exported in it (`backbone.safetensors`, for `fastse knn` / `eval-linear`) when given. Not
    counted among the last `keep` checkpoints, never pruned. The new folder is complete before the old one
    moves aside (to `.best-old`) and it moves in; a crash between those two renames is undone by
    `best_checkpoint`, which moves the old one back."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _restore_best(run_dir)
    extra = (lambda tmp: export_backbone(tmp, backbone)) if backbone is not None else None
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


# ----------------------------------------------------------------------------------- backbone


def _resnet_arch(net: nn.Module) -> tuple[str, bool]:
    """(torchvision arch name, CIFAR stem or not) of a ResNet backbone from `fastse.models.resnet_backbone`."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    try:
        depths = tuple(len(getattr(net, f"layer{i}")) for i in range(1, 5))
        block, conv1 = type(net.layer1[0]), net.conv1
    except (AttributeError, TypeError, IndexError):
        raise ValueError(f"export_backbone: a {type(net).__name__} is not a torchvision ResNet") from None
    archs = {(BasicBlock, (2, 2, 2, 2)): "resnet18", (BasicBlock, (3, 4, 6, 3)): "resnet34",
             (Bottleneck, (3, 4, 6, 3)): "resnet50", (Bottleneck, (3, 4, 23, 3)): "resnet101"}
    if (block, depths) not in archs:
        raise ValueError(f"export_backbone: unknown ResNet ({block.__name__} blocks, depths {depths})")
    return archs[block, depths], tuple(conv1.kernel_size) == (3, 3)


def export_backbone(path: str | Path, backbone: nn.Module) -> Path:
    """Write `backbone`'s state_dict (torchvision names; DDP/compile wrappers removed) as
    `backbone.safetensors` in the folder `path` (or to `path` itself if it ends in .safetensors),
    atomically, with header metadata {"format", "arch", "cifar_stem", "feature_dim", "fastse_version",
    "sha256"}: "sha256" is that of the tensor data (the bytes after the header), which `load_backbone`
    checks.

    Loading: `torchvision.models.<arch>()` then `load_state_dict(load_file(file), strict=False)`
    (only fc.weight / fc.bias missing; set `fc = nn.Identity()` for features). A CIFAR-stem export
    has a 3x3 conv1 and no max-pool: replace `conv1` with `nn.Conv2d(3, 64, 3, 1, 1, bias=False)` and
    `maxpool` with `nn.Identity()` first, or use `load_backbone`, which does that from the metadata."""
    from fastse.smoothing import unwrap

    net = unwrap(backbone)
    arch, cifar_stem = _resnet_arch(net)
    path = Path(path)
    file = path if path.suffix == ".safetensors" else path / "backbone.safetensors"
    file.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": BACKBONE_FORMAT, "arch": arch, "cifar_stem": str(cifar_stem).lower(),
            "feature_dim": str(getattr(net, "feature_dim", "")), "fastse_version": fastse.__version__}
    tensors = _cpu_tensors("backbone", net.state_dict())
    meta["sha256"] = _tensor_data_sha256(st_save(tensors, metadata=meta))
    data = st_save(tensors, metadata=meta)  # the same tensor data after a longer header
    tmp = file.with_name(f".{file.name}.{os.getpid()}-{secrets.token_hex(4)}")
    try:
        _write_synced(tmp, data)
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(file.parent)
    return file


def _tensor_data_sha256(data: bytes) -> str:
    """The sha256 of a safetensors file's tensor data: the bytes after its 8-byte length and JSON header."""
    return hashlib.sha256(memoryview(data)[8 + int.from_bytes(data[:8], "little"):]).hexdigest()


def load_backbone(path: str | Path, *, device: str | torch.device = "cpu") -> nn.Module:
    """The ResNet backbone (fc = Identity, eval mode, on `device`) saved by `export_backbone`; CheckpointError
    where the tensor data does not match the sha256 in its header (a damaged file). An export without one
    (written before fastse checked them) loads with a warning."""
    from fastse.models import resnet_backbone

    path = Path(path)
    file = path / "backbone.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"{file}: does not exist")
    try:
        with safe_open(file, "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors' own error types
        raise CheckpointError(f"{file}: not a safetensors file ({e})") from None
    if meta.get("format") != BACKBONE_FORMAT:
        raise CheckpointError(f"{file}: not a {BACKBONE_FORMAT} export (format {meta.get('format')!r})")
    data = file.read_bytes()
    if "sha256" not in meta:
        log.warning("%s: no checksum (exported before fastse checked backbones): loaded unverified", file)
    elif _tensor_data_sha256(data) != meta["sha256"]:
        raise CheckpointError(f"{file}: sha256 of its tensors does not match its header (the file is corrupt)")
    net = resnet_backbone(meta["arch"], cifar_stem=meta["cifar_stem"] == "true")
    net.load_state_dict(st_load(data))
    return net.to(device).eval()
