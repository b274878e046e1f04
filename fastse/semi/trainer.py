"""The FixMatch loop: data, student and smoothed teacher, optimizer, DDP, compile, evaluation, checkpoints.

One step: a labeled batch (weak view), an unlabeled batch (weak + strong views) -> one student forward
of all three (bf16 autocast on CUDA) -> `fixmatch_loss` -> backward -> SGD step -> `Smoother.step`
(the teacher update: parameters smoothed, BN statistics copied or averaged from the student). The
loss terms are summed on the device and read, with the teacher statistics, every `log_every` steps.
Every `eval_every` steps both models are evaluated on the test set (sharded over the ranks); the
result reports the last accuracies and the median of the last 20 evaluations (FixMatch's way). Every
`ckpt_every` steps and at the end rank 0 writes a checkpoint; `resume=True` continues from the newest
one exactly where it stopped (bit-identically on CPU with `deterministic`). Beside the step, as in
pretraining (`engine.base`): the first batch's weak and strong unlabeled views go to `views.png`
(`engine.preview`), and an evaluation whose `monitor` top-1 is the best so far makes that step the run's
`best/` checkpoint.

Faults are met as in pretraining (`fastse.engine.runs`): every rank checks the settings, a resumed
run's fixed settings (model, labels, teacher rule) and the run folder before it joins the process group
or touches a GPU; the data is checked before any model is built (on resume: the same images and labeled
split seed as the checkpoint's); a non-finite loss stops the run at the next log line or checkpoint, and
no checkpoint is written unless the losses so far and the state to save are finite and the ranks'
teachers agree, so the newest checkpoint is always a good one; a rank that raises ends all ranks
(`launch.abort`).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from fastse import checkpoints as ckpt
from fastse import distributed as ddp
from fastse.engine import progress, runs
from fastse.engine.base import RunTrainer
from fastse.engine.logging import RunLog, teacher_stats, wandb_options
from fastse.engine.optim import set_lr
from fastse.engine.runs import TrainingError
from fastse.models import WideResNet
from fastse.pipelines.datasets import SPLIT_FILE, save_split
from fastse.results import MEDIAN_OF  # evaluations in the reported median
from fastse.semi.config import SemiConfig
from fastse.semi.data import Batch, SemiData, build_data
from fastse.semi.fixmatch import STATS, FixMatch, build_optimizer, fixmatch_loss, fixmatch_lr
from fastse.smoothing import Smoother

# fields that may change between a run and its resumption without changing what is trained
_RESUMABLE = frozenset({"max_steps", "time_limit", "out", "wandb", "wandb_project", "wandb_entity", "wandb_group",
                        "wandb_tags", "wandb_name", "log_every", "eval_every",
                        "ckpt_every", "keep_ckpts", "device", "cache_dir", "compile", "compile_mode", "data",
                        "monitor"})
# fields a resumed run must share with its checkpoint: the model, labeled split and teacher rule it holds
_FIXED = ("depth", "widen", "num_labels", "rule", "keep_prob", "granularity", "buffers")

__all__ = ["SemiTrainer", "train", "TrainingError", "checkpoint_bytes"]


def train(config: SemiConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run `config` (under torchrun: on every process) and return the final metrics."""
    return SemiTrainer(config, resume=resume).fit()


class SemiTrainer(RunTrainer):
    """Builds everything in `__init__` (joining the torchrun process group, if any); `fit` trains."""

    fixed, resumable = _FIXED, _RESUMABLE
    compiled_what = "student, teacher and loss"

    def __init__(self, config: SemiConfig, *, resume: bool = False):
        super().__init__(config, resume=resume, checkpoint_bytes=checkpoint_bytes)

    def _build(self, start: runs.Start | None) -> None:
        """In the group: data (checked; the labeled split saved or read), models, optimizer, smoother, the
        resumed state, wrappers, run log."""
        c, env = self.config, self.env
        saved_split = self.out / SPLIT_FILE if start is not None else None
        if start is not None and (was := _split_seed(start[1]["config"])) != (now := _split_seed(c.to_dict())):
            raise ckpt.CheckpointError(f"--resume: {self.out} trains on the labeled split drawn with split seed {was} "
                                       f"({SPLIT_FILE}), this run asks for split seed {now}: resume with "
                                       f"--split-seed {was} or choose another output folder")
        data = None
        for first in (True, False):  # local rank 0 downloads, decodes and caches first; the others reuse it
            if (env.local_rank == 0) == first:
                data = build_data(c, env, self.amp_dtype or torch.float32, saved_split=saved_split)
            ddp.barrier()
        self.data: SemiData = data
        self.data_record = runs.data_record(data.train)
        if start is not None:  # the same images as the checkpoint's (or refused), before any model
            runs.check_same_data(start[1], self.data_record, out=self.out, say=self.print)
        if start is None and env.is_main:
            save_split(self.out / SPLIT_FILE, data.split, data.train.files)
        self.stop_step = min(c.total_steps, c.max_steps or c.total_steps)

        runs.seed_all(c.seed)
        student = WideResNet(data.num_classes, c.depth, c.widen).to(env.device)
        if c.channels_last:
            student.to(memory_format=torch.channels_last)
        for t in student.state_dict().values():  # one initial state everywhere
            ddp.broadcast_(t)
        self.model = FixMatch(student, threshold=c.threshold, lambda_u=c.lambda_u,
                              teacher_targets=c.teacher_targets).train()
        self.optimizer = build_optimizer(student, lr=c.lr, momentum=c.sgd_momentum, weight_decay=c.weight_decay,
                                         fused=True if self.cuda else None)
        self.smoother = Smoother(student, self.model.teacher, rule=c.rule, keep_prob=c.keep_prob,
                                 momentum=c.momentum, granularity=c.granularity, buffers=c.buffers, seed=c.seed)
        self.step, self.evals = 0, []
        if start is not None:
            self._load(*start)
        self.check_same_start()
        self.best_value = self._best_so_far(start)

        train_student, teacher = student, self.model.teacher
        if env.world_size > 1:
            train_student = torch.nn.parallel.DistributedDataParallel(
                student, device_ids=[env.device.index] if self.cuda else None, gradient_as_bucket_view=True)
        self.eval_student = student  # evaluated without DDP (no collectives in its forward)
        if self.compiled:  # static shapes: each graph (student train and eval, teacher, loss) is compiled once
            self.eval_student = self.compile(student)
            train_student = self.eval_student if env.world_size == 1 else self.compile(train_student)
            teacher = self.compile(teacher)
            self.model.wrap(loss=self.compile(fixmatch_loss))
        self.model.wrap(student=train_student, teacher=teacher)
        self.log = RunLog(self.out, c.to_dict(), **wandb_options(c, "semi"), enabled=env.is_main,
                          resume_step=self.step)

    # ------------------------------------------------------------------------------------ loop

    def fit(self) -> dict[str, Any]:
        c, env = self.config, self.env
        resumed = f" | resumed at step {self.step}" if self.step else ""
        self.print(f"semi fixmatch+{c.rule} WRN-{c.depth}-{c.widen} | {self.data.summary} | {env.world_size} "
                   f"process(es) on {env.device} | batch {c.labeled_batch} labeled + {c.unlabeled_batch} unlabeled "
                   f"| {self.stop_step} of {c.total_steps} steps{resumed}")
        result: dict[str, Any] = {"run_dir": str(self.out)}
        self.losses = runs.LossMeter(env.device, (len(STATS),))
        window = (self.step, time.perf_counter())  # (step, time) where the current steps/s window starts
        first_step = self.step
        saved = self.step if self.step else None  # a resumed run starts at its checkpoint
        evaluated = self.evals[-1]["step"] if self.evals else None
        batches, stopped = self.data.batches(self.step), None
        with self._running(), self.progress_bar() as bar:
            while self.step < self.stop_step and not stopped:
                batch = next(batches)
                if self.step == first_step:
                    self._preview(batch)
                stats = self.train_step(batch)
                self.step += 1
                bar.update()
                self.losses.add(stats, self.step)  # steps count from 1, as in the log lines
                if self.step == first_step + 1:
                    result["first_step_s"] = self._first_step_done(window[1])
                    window = (self.step, time.perf_counter())
                last = self.step == self.stop_step
                if self.step % c.log_every == 0 or last:
                    result.update(self._log_interval(window))
                    window = (self.step, time.perf_counter())
                    stopped = None if last else self._stop_reason()
                if self.step % c.eval_every == 0 or last:
                    result.update(self._evaluate())
                    evaluated = self.step
                if self.step % c.ckpt_every == 0 or last:
                    result["checkpoint"] = self._save()
                    saved = self.step
                if evaluated == self.step or saved == self.step:
                    window = (self.step, time.perf_counter())  # steps/s counts training only
            if evaluated != self.step and not stopped:  # a run resumed at its end
                result.update(self._evaluate())
            if saved != self.step:
                result["checkpoint"] = self._save()
            if stopped:
                return {**result, **self._stopped(stopped), "step": self.step}
            result.update(self._report())
            return result

    def train_step(self, batch: Batch) -> Tensor:
        """One optimisation step and teacher update; returns the `STATS` vector (on the device, detached)."""
        self.step_begin()
        set_lr(self.optimizer, fixmatch_lr(self.step, self.config.total_steps, self.config.lr))
        with self._autocast():
            loss, stats = self.model(*batch)
        self._update(loss)
        return stats

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Top-1 accuracy (%) of teacher and student on the whole test set (each rank its shard), in eval
        mode. Every rank first takes rank 0's BN statistics, so the models measured are rank 0's."""
        ddp.broadcast_buffers(self.model)
        self.model.student.eval()
        correct = torch.zeros(2, dtype=torch.int64, device=self.env.device)
        d = self.data
        try:
            with self._autocast():
                for x, y in zip(d.test_images.split(d.eval_batch), d.test_labels.split(d.eval_batch)):
                    for i, net in enumerate((self.model.teacher_fn, self.eval_student)):
                        correct[i] += (net(x).argmax(1) == y).sum()
        finally:
            self.model.student.train()
        if self.env.world_size > 1:
            dist.all_reduce(correct)
        teacher, student = (100.0 * v / d.n_test for v in correct.tolist())
        return {"teacher_acc": teacher, "student_acc": student}

    def _log_interval(self, window: tuple[int, float]) -> dict[str, Any]:
        """Read the mean loss terms since the last line and the teacher statistics (the host sync), check
        them, write one metrics line; steps/s over `window` = (first step, its start time)."""
        c = self.config
        values = dict(zip(STATS, self._checked(lambda: self.losses.mean(self.step)).tolist()))
        # the teacher update draws the same masks on every rank: verify it while syncing anyway
        checksum = self._checked(lambda: ddp.check_same_across_ranks(self.model.teacher))
        elapsed, steps = time.perf_counter() - window[1], self.step - window[0]
        rate = steps / elapsed if elapsed > 0 and steps else 0.0
        correct = values.pop("correct")
        m = {"step": self.step, **values, "pseudo_acc": correct / values["mask"] if values["mask"] else 0.0,
             "lr": fixmatch_lr(self.step - 1, c.total_steps, c.lr), **teacher_stats(self.smoother, momentum=True),
             "steps_per_s": rate, "img_per_s": rate * (c.labeled_batch + c.unlabeled_batch)}
        if rate:
            m["eta_s"] = (self.stop_step - self.step) / rate
        if checksum is not None:
            m["teacher_checksum"] = list(checksum)
        self.log.log(m)
        self.print(_progress_line(m, self.stop_step))
        progress.postfix(loss=m["loss"])
        return {"loss": m["loss"], "steps_per_s": rate}

    def _evaluate(self) -> dict[str, float]:
        started = time.perf_counter()
        acc = self.evaluate()
        self.evals.append({"step": self.step, **acc})
        seconds = time.perf_counter() - started
        self.log.log({"step": self.step, **acc, "eval_s": seconds})
        self.print(f"step {self.step}: test top-1 teacher {acc['teacher_acc']:.2f}% student {acc['student_acc']:.2f}% "
                   f"({seconds:.1f} s)")
        if best := self._keep_best(acc):
            return {**acc, "best": best}
        return acc

    def _preview(self, batch: Batch) -> None:
        """The weak and strong views of the first unlabeled images of `batch` (the first of the run):
        `views.png` and the wandb image "views" (`_write_preview`)."""
        recipe = self.data.unlabeled.recipe  # the strong recipe; the weak one has its mean and std
        caption = (f"FixMatch augmentation at {recipe.size} px: row 1 the weak, row 2 the strong view of the first "
                   f"unlabeled images of step {self.step + 1}")
        self._write_preview(batch[2:4], recipe, caption)

    def _report(self) -> dict[str, Any]:
        """The final line: last accuracies, the medians of the last `MEDIAN_OF` evaluations and (DDP) the
        teacher checksum, once every byte of the ranks' teachers is found equal."""
        last = self.evals[-MEDIAN_OF:]
        r = {"step": self.step, "teacher_acc": last[-1]["teacher_acc"], "student_acc": last[-1]["student_acc"],
             "teacher_acc_median": statistics.median(e["teacher_acc"] for e in last),
             "student_acc_median": statistics.median(e["student_acc"] for e in last), "evaluations": len(last)}
        if checksum := self._teachers_bit_identical(self.model.teacher):
            r.update(teacher_checksum=checksum, teacher_bit_identical=True)
        self.log.log({**r, "final": True})
        self.print(f"final at step {self.step}: teacher ({self.config.rule}) top-1 {r['teacher_acc']:.2f}% "
                   f"(median of the last {len(last)} evaluations {r['teacher_acc_median']:.2f}%), student "
                   f"{r['student_acc']:.2f}% (median {r['student_acc_median']:.2f}%)")
        return r

    # ----------------------------------------------------------------------------- checkpoints

    def _save(self, best: dict[str, Any] | None = None) -> str:
        """Checkpoint the current step (`_write_checkpoint`), with the evaluations so far; with `best` (every
        rank alike), the run's best/ checkpoint."""
        return self._write_checkpoint(self.model, best=best, evals=self.evals, data=self.data_record)

    def _load(self, path: Path, meta: dict) -> None:
        groups, meta = ckpt.load_checkpoint(path, device=self.env.device)  # checksums verified
        self.model.student.load_state_dict(groups["student"])
        self.model.teacher.load_state_dict(groups["teacher"])
        ckpt.optimizer_from_tensors(self.optimizer, groups["optimizer"], meta["optimizer_layout"])
        self.smoother.load_state_dict(meta["smoother"])
        ckpt.set_rng_state(groups["rng"])
        self.step, self.evals = int(meta["step"]), list(meta["evals"])


# --------------------------------------------------------------------------------------- helpers


def checkpoint_bytes(config: SemiConfig) -> int:
    """About the bytes of one checkpoint of `config`'s run: student and teacher (a WRN-depth-widen with
    100 outputs, the most of the CIFAR sets: the classifier is a small part of it) and the SGD momentum
    of every parameter. Counted on the meta device: no memory, no GPU."""
    with torch.device("meta"):
        student = WideResNet(100, config.depth, config.widen)
    return runs.checkpoint_size([*student.state_dict().values()] * 2, student.parameters())


def _split_seed(config: dict[str, Any]) -> int:
    """The seed that draws the labeled split of a run of `config` (a `SemiConfig.to_dict()`)."""
    return config["seed"] if config.get("split_seed") is None else config["split_seed"]


def _progress_line(m: dict[str, Any], total_steps: int) -> str:
    """step, loss (labeled + unlabeled terms), mask rate, pseudo-label accuracy, lr, teacher, speed, ETA."""
    parts = [f"step {m['step']}/{total_steps}", f"loss {m['loss']:.4f} (x {m['loss_x']:.4f} u {m['loss_u']:.4f})",
             f"mask {m['mask']:.3f}", f"pl-acc {m['pseudo_acc']:.3f}", f"lr {m['lr']:.4g}"]
    if "updated_fraction" in m:
        parts.append(f"upd {m['updated_fraction']:.2f}")
    parts += [f"dist {m['distance']:.4f}", f"{m['steps_per_s']:.1f} steps/s"]
    if "eta_s" in m:
        parts.append(f"eta {progress.duration(m['eta_s'])}")
    return " | ".join(parts)
