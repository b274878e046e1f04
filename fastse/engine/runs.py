"""What both training loops (`pretrain.trainer`, `semi.trainer`) do with a run and its folder, so that they
start, stop and save alike.

Before joining the process group or touching a GPU, every rank runs `preflight`: the settings, a
writable run folder with room for a checkpoint that no other run owns (rank 0 locks it), and the
checkpoint to resume (`find_checkpoint`: never afresh over another run's or damaged checkpoints, never
with another run's fixed settings). While training, `LossMeter` watches the losses on the device
without a sync; every save first checks them and the state to save (`check_before_save`), so the newest
checkpoint is always a good one. `checked` turns a failed check into one `TrainingError` naming the
step and the checkpoint kept; `save_checkpoint` does the same for a write that fails (a full disk).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from fastse import checkpoints as ckpt
from fastse import distributed as ddp
from fastse.engine import launch
from fastse.models.export import export_backbone
from fastse.runlock import RunLock
from fastse.settings import renamed

T = TypeVar("T")
FINGERPRINT_FILES = 64  # files whose byte sizes the data fingerprint takes in (`data_record`)
Start = tuple[Path, dict]  # (checkpoint folder, its meta.json) a run resumes from


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step."""


class RunConfig(Protocol):
    """What `preflight` reads of a run's config (`PretrainConfig`, `SemiConfig`)."""

    out: str
    device: str
    keep_ckpts: int
    monitor: str  # "none": no best/ checkpoint

    def validate(self, world_size: int = 1) -> Any: ...

    def to_dict(self) -> dict[str, Any]: ...


# ------------------------------------------------------------------------------------ starting a run


def preflight(config: RunConfig, *, resume: bool, fixed: Sequence[str],
              checkpoint_bytes: Callable[[Any], int]) -> tuple[ddp.Dist, Start | None, RunLock | None]:
    """Every check that needs neither the process group nor a GPU: the settings (`config.validate` for
    the launcher's world size), that the run folder can be written and has room for checkpoints of about
    `checkpoint_bytes(config)` bytes (the last `keep_ckpts` and, unless `monitor` is "none", best/), that
    no other run owns it, and the checkpoint to resume (`find_checkpoint`). Returns this process's place
    (`launch.launch_env`), the checkpoint to start from (None: a fresh start) and, on rank 0, the run
    folder's lock, held for all the run's ranks until released. Raises ValueError (CheckpointError, for the
    folder; FolderInUse) with one line."""
    env = launch.launch_env(config.device)
    config.validate(env.world_size)
    out = Path(config.out)
    ckpt.check_run_dir(out, checkpoint_bytes(config), keep=config.keep_ckpts,
                       best=getattr(config, "monitor", "none") != "none")
    lock = None
    if env.is_main:
        try:
            lock = RunLock(out)
        except OSError as e:
            raise ckpt.CheckpointError(f"{out}: the run folder cannot be written ({e.strerror or e})") from None
    try:
        start = find_checkpoint(out, resume, config=config.to_dict(), fixed=fixed,
                                say=lambda text: print(text, flush=True) if env.is_main else None)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return env, start, lock


def checkpoint_size(state: Iterable[Tensor], trained: Iterable[Tensor], exported: Iterable[Tensor] = ()) -> int:
    """About the bytes of one checkpoint (each trainer's `checkpoint_bytes`, for `preflight`): the tensors of
    `state` (student, teacher, queue), one optimizer buffer per tensor of `trained` (SGD and LARS momentum)
    and `exported` (a backbone export beside it). Give tensors of models built on the meta device
    (`with torch.device("meta")`): no memory, no GPU."""
    size = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)
    return size(state) + size(trained) + size(exported)


def recorded_data(out: Path) -> str | None:
    """The `data` setting of the newest checkpoint in the run folder `out` (not verified here: resuming
    verifies it), or None: what `--resume` without `--data` trains on."""
    latest = ckpt.latest_checkpoint(out, verify=False) if out.is_dir() else None
    return json.loads((latest / ckpt.META).read_text())["config"].get("data") if latest else None


def find_checkpoint(out: Path, resume: bool, *, config: dict[str, Any], fixed: Sequence[str] = (),
                    say: Callable[[str], None] = print) -> Start | None:
    """(path, meta) of the newest complete checkpoint (checksums verified) in the run folder `out` to
    resume from, or None for a fresh start. Refuses (CheckpointError) to start afresh over another
    run's checkpoints without `resume` or over damaged ones, and to resume a run whose `fixed` fields
    (the model, optimizer and teacher rule its checkpoint holds) differ from `config`'s."""
    latest = ckpt.latest_checkpoint(out) if out.is_dir() else None
    if latest is None:
        if damaged := sorted(p.name for p in (out / "checkpoints").glob("step-*")):
            raise ckpt.CheckpointError(f"{out}: none of its checkpoints is complete ({', '.join(damaged)}): "
                                       "remove them to start afresh, or choose another output folder")
        if resume:
            say(f"--resume: no checkpoint in {out}, starting from scratch")
        return None
    if not resume:
        raise ckpt.CheckpointError(f"{out} already holds checkpoints ({latest.name}): "
                                   "resume it (--resume) or choose another output folder")
    meta = json.loads((latest / ckpt.META).read_text())
    meta["config"] = saved = renamed(meta.get("config", {}))  # a checkpoint saved before a rename: the new names
    if differ := [k for k in fixed if saved.get(k) != config[k]]:
        was, asked = (", ".join(f"{k}={d.get(k)!r}" for k in differ) for d in (saved, config))
        raise ckpt.CheckpointError(f"--resume: {out} holds a run with {was}, this one has {asked}: "
                                   "resume with the run's settings or choose another output folder")
    return latest, meta


def data_record(index: Any) -> dict[str, Any]:
    """What a checkpoint records of the images trained on, `index` (a `datasets.ImageFolderIndex`), for a
    resume to compare (`check_same_data`): the root, the image count and a fingerprint (16 hex digits of a
    sha256) of the classes, the files' names under the root, labels and pixel sizes, and the byte sizes of
    up to FINGERPRINT_FILES files spread over the set (no image is read)."""
    files = index.files
    digest = hashlib.sha256(f"{index.classes}\n".encode())
    cut = len(str(index.root)) + 1
    digest.update("\n".join(str(f)[cut:] for f in files).encode())
    digest.update(np.ascontiguousarray(index.labels, dtype=np.int64).tobytes())
    if index.sizes is not None:
        digest.update(np.ascontiguousarray(index.sizes, dtype=np.int32).tobytes())
    picks = np.linspace(0, len(files) - 1, min(len(files), FINGERPRINT_FILES)).round().astype(int)
    digest.update(str([os.path.getsize(files[i]) for i in picks]).encode())
    return {"root": str(index.root), "images": len(files), "fingerprint": digest.hexdigest()[:16]}


def check_same_data(meta: dict[str, Any], data: dict[str, Any], *, out: Path, say: Callable[[str], None]) -> None:
    """Refuse (CheckpointError) to resume the run of `out`, whose checkpoint `meta` records the images it was
    trained on, on other images (`data`, this run's `data_record`): another count or fingerprint. The same
    images under another root are said and trained on; a checkpoint that records none (written before fastse
    did) is said, not checked."""
    saved = meta.get("data")
    if not isinstance(saved, dict):
        say(f"--resume: the checkpoint of {out} does not record its data (written by an older fastse): "
            f"not checked that {data['root']} holds the images it was trained on")
        return
    if (saved.get("images"), saved.get("fingerprint")) != (data["images"], data["fingerprint"]):
        raise ckpt.CheckpointError(
            f"--resume: {out} was trained on {saved.get('images')} images of {saved.get('root')} (fingerprint "
            f"{saved.get('fingerprint')}), this run reads {data['images']} of {data['root']} (fingerprint "
            f"{data['fingerprint']}): resume with the run's data or choose another output folder")
    if saved.get("root") != data["root"]:
        say(f"--resume: the data moved from {saved.get('root')} to {data['root']} (the same {data['images']} images)")


def changed_fields(saved: dict[str, Any], now: dict[str, Any], resumable: Collection[str] = ()) -> str:
    """`field old -> new, ...` for the settings that differ between a checkpoint's config and this run's,
    leaving out the `resumable` ones (paths, logging, stopping step: what does not change the training)."""
    return ", ".join(f"{k} {saved.get(k)!r} -> {v!r}" for k, v in now.items()
                     if k not in resumable and saved.get(k) != v)


def set_determinism(on: bool, cuda: bool) -> None:
    """Deterministic kernels (and no cuDNN autotuning or TF32) when `on`; the fast defaults otherwise.
    Call it before the first CUDA work (cuBLAS reads its workspace setting once)."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)
    if cuda:
        torch.backends.cudnn.benchmark = not on
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not on


def seed_all(seed: int) -> None:
    """Seed torch's, Python's and NumPy's global generators (all of which checkpoints hold): every run
    of a config starts alike, so a resumed run's checkpoints match the uninterrupted run's bit for bit."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


# ------------------------------------------------------------------------------------- while training


class LossMeter:
    """Per-step losses (a scalar, or a vector of loss terms, of `shape`) kept on the device until the
    next `mean`; `check` finds the first step whose values were not all finite (NaN or Inf). `add`
    launches nothing (the step is host-bound); `mean` and `check` read them (on every rank: collectives)."""

    def __init__(self, device: torch.device, shape: tuple[int, ...] = ()):
        self.device, self.shape = device, shape
        self.losses: list[Tensor] = []
        self.steps: list[int] = []

    def add(self, loss: Tensor, step: int) -> None:
        """Count `loss` (detached, of `shape`) as that of step `step`."""
        self.losses.append(loss)
        self.steps.append(step)

    def check(self, step: int) -> None:
        """Raise TrainingError on every rank if any rank's loss was not finite since the run began
        (`step`: the current step, for the message). Earlier losses passed the check of `mean`."""
        first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)
        if self.losses:
            bad = ~torch.stack(self.losses).reshape(len(self.losses), -1).isfinite().all(1)
            steps = torch.tensor(self.steps, device=self.device)
            first_bad = torch.where(bad.any(), steps[bad.int().argmax()], first_bad)
        bad = ddp.all_gather_cat(first_bad[None])
        bad = bad[bad >= 0]
        if bad.numel():
            raise TrainingError(f"the loss is not finite from step {int(bad.min())} on (found at step {step}): "
                                "training diverged")

    def mean(self, step: int) -> Tensor:
        """The mean over the ranks and the steps since the last call (then reset), after `check`; on the
        device, of `shape`."""
        self.check(step)
        local = torch.stack(self.losses).mean(0) if self.losses else torch.zeros(self.shape, device=self.device)
        self.losses, self.steps = [], []
        return ddp.all_reduce_mean(local)


@torch.no_grad()
def check_finite(state: dict[str, Tensor], *, step: int, what: str = "the model") -> None:
    """Raise TrainingError on every rank if a floating-point tensor of `state` (on any rank) holds a
    NaN or Inf, naming the first; one host sync and one small collective."""
    names = [k for k, t in state.items() if t.is_floating_point()]
    if not names:
        return
    ok = torch.stack([state[k].isfinite().all() for k in names])
    if bool(ddp.all_reduce_mean((~ok).any().float()) > 0):
        first = names[int((~ok).int().argmax())] if not bool(ok.all()) else "on another rank"
        raise TrainingError(f"step {step}: {what} holds non-finite values ({first})")


def check_before_save(losses: LossMeter, state: dict[str, Tensor], teacher: nn.Module, *, step: int) -> None:
    """What a checkpoint write of step `step` waits for, on every rank (else TrainingError or RanksDiverged
    on every rank): finite losses since the run began, a finite `state` to save and the same `teacher`
    on every rank."""
    losses.check(step)
    check_finite(state, step=step, what="the checkpoint")
    ddp.check_same_across_ranks(teacher)


def checked(check: Callable[[], T], *, step: int, out: Path, advice: str) -> T:
    """`check()`; its failure (TrainingError, RanksDiverged) re-raised as a TrainingError that also names
    the step, the checkpoint of `out` that stays the newest and, for a diverged loss or state, `advice`."""
    try:
        return check()
    except (TrainingError, ddp.RanksDiverged) as e:
        latest = ckpt.latest_checkpoint(out, verify=False) if out.is_dir() else None
        kept = f"the newest checkpoint stays {latest}" if latest else "no checkpoint was written"
        if isinstance(e, ddp.RanksDiverged):
            raise TrainingError(f"step {step}: {e}; {kept}") from e
        raise TrainingError(f"{e}; {kept}; {advice}") from e


def save_checkpoint(out: Path, step: int, groups: dict[str, dict[str, Tensor]], meta: dict, *, keep: int) -> Path:
    """`checkpoints.save_checkpoint`, whose failure to write (e.g. a full disk: the half-written folder is
    gone, older checkpoints are intact) is a TrainingError naming the step and the checkpoint kept."""
    try:
        return ckpt.save_checkpoint(out, step, groups, meta, keep=keep)
    except OSError as e:
        latest = ckpt.latest_checkpoint(out, verify=False)
        raise TrainingError(f"step {step}: the checkpoint could not be written ({e}); the newest checkpoint, "
                            f"{latest}, is kept: make room and continue with --resume") from e


def save_best(out: Path, step: int, groups: dict[str, dict[str, Tensor]], meta: dict, *,
              backbone: nn.Module | None = None) -> Path:
    """`checkpoints.save_best` (the run folder's best/), with `backbone` exported in it (`backbone.safetensors`,
    `models.export`) when given, whose failure to write is a TrainingError naming the step, as for
    `save_checkpoint`."""
    extra = (lambda folder: export_backbone(folder, backbone)) if backbone is not None else None
    try:
        return ckpt.save_best(out, step, groups, meta, extra=extra)
    except OSError as e:
        raise TrainingError(f"step {step}: the best checkpoint could not be written to {out / ckpt.BEST} ({e}): "
                            "make room and continue with --resume") from e
