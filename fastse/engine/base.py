"""What the pretraining and FixMatch loops share around their step.

`RunTrainer.__init__` checks everything it can before joining the process group or touching a GPU
(`runs.preflight`; rank 0 then owns the run folder until `close`), joins the group, sets determinism,
then calls the subclass's `_build(start)` (data, models, optimizer, smoother, resumed state), ending
every rank if any of that fails. The rest: bf16 autocast, `torch.compile` with the configured mode, the
first-step (compile) timing, rank-0 printing and checks whose failure becomes a `TrainingError` naming
the step.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastse import checkpoints as ckpt
from fastse import distributed as ddp
from fastse.engine import launch, progress, runs
from fastse.engine.amp import autocast
from fastse.engine.watchdog import StopWatchdog

CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that replay CUDA graphs
# stop at the next log line with a checkpoint (SLURM, preemption, Ctrl-C; a second Ctrl-C stops at once)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# a rank of several that is stuck in one call this long after a stop signal (a collective whose peer is gone)
# exits at once without a checkpoint (`watchdog.StopWatchdog`); torchrun would SIGKILL it after 30 s
STOP_GRACE_S = 5.0


class RunTrainer:
    """Base of `Trainer` and `SemiTrainer`. Subclasses set `fixed` (settings a resumed run must share
    with its checkpoint), `resumable` (settings that may change on resume without a note), `compiled_what`
    and `lr_unit`, and implement `_build`."""

    fixed: tuple[str, ...] = ()
    resumable: frozenset[str] = frozenset()
    compiled_what = "the models"
    lr_unit = ""

    def __init__(self, config: Any, *, resume: bool, checkpoint_bytes: Callable[[Any], int]):
        self.owns_group = not ddp.is_initialized()
        if resume and config.data is None and (data := runs.recorded_data(Path(config.out))):
            config = config.replace(data=data)  # --resume without --data: the data the run trained on
        # every rank checks everything it can before joining the group or touching a GPU; rank 0 locks the folder
        self.env, start, self.lock = runs.preflight(config, resume=resume, fixed=self.fixed,
                                                    checkpoint_bytes=checkpoint_bytes)
        self.config, self.out = config, Path(config.out)
        self.cuda = self.env.device.type == "cuda"
        try:
            self._check_env()
            runs.set_determinism(config.deterministic, self.cuda)
            self.env = launch.init_distributed(config.device)
            if start is not None and (changed := runs.changed_fields(start[1]["config"], config.to_dict(),
                                                                     self.resumable)):
                self.print(f"resuming with changed settings: {changed}")
            self.amp_dtype = torch.bfloat16 if self.cuda and config.dtype == "bf16" else None
            self.compiled = self.cuda if config.compile is None else config.compile
            self.step = 0
            self._build(start)
        except BaseException as e:
            launch.abort(e)
            if self.owns_group:
                launch.cleanup()
            if self.lock is not None:
                self.lock.release()
            raise

    def close(self) -> None:
        """Close the run log and give the run folder up: `fit` does at its end; call it for a trainer that
        is built but not trained."""
        self.log.close()
        if self.lock is not None:
            self.lock.release()

    @contextlib.contextmanager
    def _running(self):
        """Around `fit`'s loop: a failure ends every rank (`launch.abort`); the run log is closed, the
        run folder given up and the process group left either way. SIGTERM, SIGUSR1 and a first Ctrl-C
        (SIGINT) are noted for `_stop_reason` meanwhile (in the main thread; the previous handlers come
        back after); a Ctrl-C after a noted signal raises KeyboardInterrupt at once. With several ranks, a
        rank stuck in one call `STOP_GRACE_S` after such a signal exits at once (`StopWatchdog`): its peers
        cannot answer."""
        self.stop_signal: str | None = None
        self.fit_started = time.monotonic()
        self._watchdog: StopWatchdog | None = None
        handlers, watching = {}, contextlib.ExitStack()
        if threading.current_thread() is threading.main_thread():
            def note(signum: int, frame: Any) -> None:
                if signum == signal.SIGINT and self.stop_signal:
                    raise KeyboardInterrupt
                self.stop_signal = signal.Signals(signum).name
                if signum == signal.SIGINT:
                    self.print("stopping at the next log line with a checkpoint (Ctrl-C again: now, without one)")
            handlers = {sig: signal.signal(sig, note) for sig in STOP_SIGNALS}
            if self.env.world_size > 1:
                self._watchdog = watching.enter_context(StopWatchdog(STOP_SIGNALS, STOP_GRACE_S))
        try:
            yield
        except BaseException as e:
            launch.abort(e)
            raise
        finally:
            watching.close()
            for sig, previous in handlers.items():
                signal.signal(sig, previous)
            self.close()
            if self.owns_group:
                launch.cleanup()

    def _stop_reason(self) -> str | None:
        """Why to stop before the end, asked at log lines (a host sync anyway): a SIGTERM or SIGUSR1
        received (by any rank), or `config.time_limit` minutes passed since `fit` began; every rank gets
        the same answer. None: go on."""
        limit = self.config.time_limit
        code = 2 if self.stop_signal else int(limit is not None and time.monotonic() - self.fit_started >= 60 * limit)
        if self.env.world_size > 1:
            agreed = torch.tensor([code], device=self.env.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            code = int(agreed.item())
        if code and self._watchdog:
            self._watchdog.stand_down()  # every rank answered: the stop's checkpoint may take long calls
        if code == 2:
            return self.stop_signal or "a stop signal to another process"
        return f"the time limit of {limit:g} min" if code else None

    def _stopped(self, reason: str) -> dict[str, Any]:
        """Record an early stop (its checkpoint written): a metrics line and one printed line."""
        self.log.log({"step": self.step, "stopped": reason})
        self.print(f"stopped at step {self.step} of {self.stop_step} ({reason}): checkpoint written; "
                   f"the same command with --resume continues")
        return {"stopped": reason}

    def _update(self, loss: Tensor, momentum: float | None = None) -> None:
        """Backward, optimizer step, teacher update (with `momentum` for this step, else the smoother's)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.smoother.step(momentum=momentum)

    def _write_checkpoint(self, model: nn.Module, extra_groups: Callable[[], dict[str, Any]] = dict, *,
                          best: dict[str, Any] | None = None, backbone: nn.Module | None = None, **meta: Any) -> str:
        """Checkpoint the current step: `model`'s `student` and `teacher`, the optimizer, the RNG states,
        `extra_groups()` and the smoother's state, config and `meta` in the metadata; the path ("" on
        ranks other than 0). Rank 0 writes; every rank first takes rank 0's buffers (BN statistics, which
        each rank accumulates from its own batches), so all hold the saved state. Nothing is written unless
        the losses since the last check were finite, the state to save is finite and the ranks' teachers
        agree (else TrainingError on every rank). With `best` ({"metric", "value", ...}: every rank calls
        alike) the checkpoint is the run's best/ instead (`checkpoints.save_best`, `backbone` exported in it)."""
        ddp.broadcast_buffers(model)
        self._checked(lambda: runs.check_before_save(self.losses, model.state_dict(), model.teacher, step=self.step))
        path = ""
        if self.env.is_main:
            opt_tensors, opt_layout = ckpt.optimizer_to_tensors(self.optimizer)
            groups = {"student": model.student.state_dict(), "teacher": model.teacher.state_dict(),
                      "optimizer": opt_tensors, "rng": ckpt.rng_state(), **extra_groups()}
            meta = {"config": self.config.to_dict(), "step": self.step, "world_size": self.env.world_size,
                    "smoother": self.smoother.state_dict(), "optimizer_layout": opt_layout, **meta}
            if best is not None:
                path = str(runs.save_best(self.out, self.step, groups, {**meta, "best": best}, backbone=backbone))
            else:
                path = str(runs.save_checkpoint(self.out, self.step, groups, meta, keep=self.config.keep_ckpts))
        ddp.barrier()
        return path

    def _save(self, best: dict[str, Any] | None = None) -> str:
        """Checkpoint the current step (`_write_checkpoint`); with `best`, as the run's best/."""
        raise NotImplementedError

    def _best_so_far(self, start: runs.Start | None) -> float:
        """The monitored metric (`config.monitor`) of the run's best/ checkpoint (resumed runs; rank 0's reading
        on every rank), -inf where there is none or it was chosen by another metric."""
        c, value = self.config, -math.inf
        if self.env.is_main and start is not None and c.monitor != "none" and (found := ckpt.best_checkpoint(self.out)):
            best = found[1].get("best") or {}
            if best.get("metric") == c.monitor and isinstance(best.get("value"), (int, float)):
                value = float(best["value"])
            else:
                self.print(f"--resume: {found[0]} is the best by {best.get('metric')}, this run monitors "
                           f"{c.monitor}: replaced at the next check")
        return float(ddp.broadcast_(torch.tensor([value], dtype=torch.float64, device=self.env.device)).item())

    def _keep_best(self, out: dict[str, float], epoch: float | None = None) -> str | None:
        """After an evaluation (`out`: rank 0's results, accuracies in %): where the monitored metric
        (`config.monitor`) beats `best_value`, the best so far, the run's best/ checkpoint becomes this step's
        (`_save(best=...)`; every rank calls, rank 0's value decides) and `best_<metric>` is logged at this step
        (and `epoch`, where the run counts epochs); the checkpoint's path, else None."""
        metric = self.config.monitor
        if metric == "none":
            return None
        value = torch.tensor([out.get(metric, math.nan)], dtype=torch.float64, device=self.env.device)
        value = float(ddp.broadcast_(value).item())
        if not math.isfinite(value) or value <= self.best_value:
            return None
        self.best_value = value
        at = {"step": self.step} if epoch is None else {"step": self.step, "epoch": epoch}
        path = self._save(best={"metric": metric, "value": value, **at})
        self.log.log({**at, f"best_{metric}": value})
        when = f"step {self.step}" if epoch is None else f"epoch {epoch:g}"
        self.print(f"best {metric} so far: {value:.2f}% at {when} -> {path}")
        return path

    def _write_preview(self, views: Sequence[Tensor], recipe: Any, caption: str) -> None:
        """The first batch's `views` (V batches [B, 3, S, S] normalised by `recipe`'s mean/std) of a few images,
        as the pipeline produced them: `views.png` in the run folder and the wandb image "views" with `caption`
        (rank 0; once per run folder, see `engine.preview`). A failure to write is a warning."""
        if not self.env.is_main:
            return
        from fastse.engine.preview import FILE, write_views

        try:
            write_views(self.out, views, recipe, self.log, step=self.step, caption=caption)
        except OSError as e:  # a picture is not worth stopping the run for
            self.print(f"warning: {self.out / FILE} could not be written ({e.strerror or e})")

    def _teachers_bit_identical(self, teacher: nn.Module) -> list[float] | None:
        """Under DDP, at the end (the checksums agreed at every log line): every byte of `teacher`
        compared with rank 0's and the result printed; the shared checksum, or None on one process."""
        if self.env.world_size == 1:
            return None
        checksum = self._checked(lambda: ddp.check_same_across_ranks(teacher, exact=True))
        self.print(f"teacher parameters bit-identical on all {self.env.world_size} processes at step {self.step} "
                   f"(checksum {checksum[0]:.17g})")
        return list(checksum)

    def _check_env(self) -> None:
        """Refuse settings this device cannot run (called before joining the process group)."""

    def _build(self, start: runs.Start | None) -> None:
        raise NotImplementedError

    def compile(self, fn: Callable) -> Callable:
        """`fn` compiled for static shapes (each graph once) in the configured mode."""
        mode = self.config.compile_mode
        return torch.compile(fn, dynamic=False, mode=None if mode == "default" else mode)

    def step_begin(self) -> None:
        """Mark a new training step for CUDA-graph modes (the previous step's graph outputs are dead)."""
        if self.compiled and self.config.compile_mode in CUDAGRAPH_MODES:
            torch.compiler.cudagraph_mark_step_begin()

    def check_same_start(self) -> None:
        """Every process starts at the same step (a resumed folder every node reads)."""
        steps = ddp.all_gather_cat(torch.tensor([self.step], device=self.env.device))
        if not bool((steps == self.step).all()):
            raise ckpt.CheckpointError(f"the processes start at different steps {steps.tolist()}: {self.out} must be "
                                       "a folder that every node reads (shared storage)")

    def step_stream(self):
        """The context the training loop runs in (`pipelines.loader.consumer_stream` of its loader): with
        a DALI loader on CUDA, a stream of the highest priority, so the loader's kernels fill the gaps of
        the step instead of delaying it."""
        from fastse.pipelines.loader import consumer_stream

        return consumer_stream(self.train_loader, self.env.device)

    def _autocast(self):
        return autocast(self.env.device, self.amp_dtype)

    def _first_step_done(self, started: float) -> float:
        """Seconds since `started` of the first step, compilation included: printed and logged."""
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        what = f"torch.compile of {self.compiled_what} + first step" if self.compiled else "first step"
        self.print(f"{what}: {seconds:.1f} s")
        self.log.log({"step": self.step, "first_step_s": seconds, "compiled": self.compiled})
        return seconds

    def print(self, text: str) -> None:
        """One line on the main process (above the progress bar, where there is one)."""
        if self.env.is_main:
            progress.echo(text)

    def progress_bar(self, unit: str = "step") -> progress.Progress:
        """The live bar of the run (rank 0, on a terminal) from the current step to `stop_step`; enter it
        around the loop and `update()` it every step. Elsewhere it draws nothing: the log lines are the
        progress."""
        return progress.Progress(self.stop_step, initial=self.step, unit=unit, enabled=self.env.is_main,
                                 desc=self.out.name)

    def _checked(self, check: Callable[[], Any]) -> Any:
        """`check()`, its failure a TrainingError naming the step, the checkpoint kept and what to do."""
        advice = f"lower the learning rate (lr={self.config.lr}{self.lr_unit}) or check the data"
        return runs.checked(check, step=self.step, out=self.out, advice=advice)
