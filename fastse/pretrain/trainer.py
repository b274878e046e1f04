"""The pretraining loop: data, method, optimizer, teacher smoothing, DDP, compile, monitor, checkpoints.

One step: augmented views -> `method(views)` (student forward with autograd, teacher forward
without, bf16 autocast on CUDA) -> backward -> optimizer step -> `Smoother.step` (the teacher
update, momentum per step). The loss is summed on the device; the host reads it, with the teacher
statistics, only every `log_every` steps. Every `ckpt_every` epochs and at the end rank 0 writes a
checkpoint (student, teacher, optimizer, queue, RNG, smoother); `resume=True` continues from the
newest one exactly where it stopped (bit-identically on CPU with `deterministic`). At the end the
teacher's backbone is exported to `backbone.safetensors` and measured by the kNN monitor. Beside the step:
the first batch's views go to `views.png` (`engine.preview`); the online probe (`pretrain.probe`) trains on
the teacher features the step computed and is measured at every kNN check; the check's `monitor` metric,
where it is the best so far, makes that step the run's `best/` checkpoint.

Faults (the checks are shared with `fastse.semi`: `engine.runs`). Before joining the process group
or touching a GPU, every rank checks the settings, that a resumed folder holds a run of the same
method and model, and that the run folder can be written and has room for a checkpoint
(`runs.preflight`); the data is checked (`scan_image_folder`, the size rule `sizes.image_sizes`, and
on resume that they are the images the checkpoint was trained on) before any model is built. A
non-finite loss stops the run (`TrainingError` naming the first step whose loss was not finite;
`LossMeter` spots it on the device without a sync) at the next log line or checkpoint, whichever
comes first: every checkpoint write first verifies the losses since the last check, that student,
teacher and queue hold only finite values and that the ranks' teachers agree, so a poisoned or
diverged teacher is never saved and the newest checkpoint stays the last good one. We stop rather
than skip such steps: by the time the host sees the loss, the optimizer and the teacher have already
taken it in, and skipping would cost a sync every step. A rank that raises tells the others, which
end within about a second (`launch.abort`). A resumed run's metrics.jsonl loses the lines of
the steps after its checkpoint, which are written again.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastse import checkpoints as ckpt
from fastse import distributed as ddp
from fastse.engine import progress, runs
from fastse.engine.base import RunTrainer
from fastse.engine.logging import RunLog, progress_line, teacher_stats, wandb_options
from fastse.engine.optim import build_optimizer, lr_at, set_lr
from fastse.engine.runs import LossMeter, TrainingError
from fastse.methods import Method, build_method
from fastse.models.export import export_backbone
from fastse.pretrain.config import PretrainConfig
from fastse.pretrain.data import build_data
from fastse.pretrain.probe import GROUP, OnlineProbe
from fastse.smoothing import Smoother, cosine_momentum

# fields that may change between a run and its resumption without changing what is trained
_RESUMABLE = frozenset({"max_steps", "time_limit", "out", "wandb", "wandb_project", "wandb_entity", "wandb_group",
                        "wandb_tags", "wandb_name", "log_every", "knn_every",
                        "knn_student", "ckpt_every", "keep_ckpts", "device", "loader", "cache_dir", "compile",
                        "compile_mode", "data", "online_probe", "probe_lr", "monitor"})
# fields a resumed run must share with its checkpoint: the model, optimizer and teacher rule it holds
_FIXED = ("method", "arch", "cifar_stem", "proj_hidden_dim", "proj_dim", "pred_hidden_dim", "queue_size",
          "optimizer", "rule", "keep_prob", "granularity", "buffers")

__all__ = ["Trainer", "train", "TrainingError", "checkpoint_bytes"]


def train(config: PretrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run `config` (under torchrun: on every process) and return the final metrics of rank 0."""
    return Trainer(config, resume=resume).fit()


class Trainer(RunTrainer):
    """Builds everything in `__init__` (joining the torchrun process group, if any); `fit` trains."""

    fixed, resumable = _FIXED, _RESUMABLE
    compiled_what, lr_unit = "student and teacher", " per 256 images"

    def __init__(self, config: PretrainConfig, *, resume: bool = False):
        super().__init__(config, resume=resume, checkpoint_bytes=checkpoint_bytes)

    def _check_env(self) -> None:
        if self.config.syncbn and not self.cuda:
            raise ValueError("syncbn=True needs CUDA devices (SyncBatchNorm)")

    def _build(self, start: tuple[Path, dict] | None) -> None:
        """In the group: data (checked), method, optimizer, smoother, the resumed state, wrappers, run log."""
        config, env = self.config, self.env
        data = None
        for first in (True, False):  # local rank 0 downloads, decodes and caches first; the others reuse it
            if (env.local_rank == 0) == first:
                data = build_data(config, env, self.amp_dtype or torch.float32)
            ddp.barrier()
        self.train_loader, self.eval_loaders, self.data_info, self.data_record = data
        if start is not None:  # the same images as the checkpoint's (or refused), before any model
            runs.check_same_data(start[1], self.data_record, out=self.out, say=self.print)
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.stop_step = min(self.total_steps, config.max_steps or self.total_steps)
        self.warmup_steps = round(config.warmup_epochs * self.steps_per_epoch)

        runs.seed_all(config.seed)
        method = build_method(config.to_dict())
        method.to(env.device)
        if config.channels_last:
            method.to(memory_format=torch.channels_last)
        for t in method.state_dict().values():  # one initial state everywhere (student, teacher, queue)
            ddp.broadcast_(t)
        self.method: Method = method.train()
        self.optimizer = build_optimizer(method.student, config.optimizer, lr=config.scaled_lr,
                                         momentum=config.sgd_momentum, weight_decay=config.weight_decay)
        self.smoother = Smoother(*method.smoothing_pairs(), rule=config.rule, keep_prob=config.keep_prob,
                                 momentum=config.momentum, granularity=config.granularity, buffers=config.buffers,
                                 seed=config.seed)
        self.probe = self._build_probe()
        if start is not None:
            self._load(*start)
        self.check_same_start()
        self.best_value = self._best_so_far(start)

        student, teacher = method.student, method.teacher
        if env.world_size > 1:
            student = torch.nn.parallel.DistributedDataParallel(
                student, device_ids=[env.device.index] if self.cuda else None, gradient_as_bucket_view=True)
        if self.compiled:  # static shapes (drop_last): each graph is compiled once
            student, teacher = self.compile(student), self.compile(teacher)
        method.wrap(student=student, teacher=teacher)
        self.log = RunLog(self.out, config.to_dict(), **wandb_options(config, "pretrain"),
                          enabled=env.is_main, resume_step=self.step)

    # ------------------------------------------------------------------------------------ loop

    def fit(self) -> dict[str, Any]:
        c, env = self.config, self.env
        self.print(f"pretrain {c.method}+{c.rule} {c.arch} | {self.data_info} | {env.world_size} process(es) "
                   f"on {env.device}, batch {c.batch_size} ({c.batch_size // env.world_size} per process) | "
                   f"{self.steps_per_epoch} steps/epoch, {self.total_steps} steps, peak lr {c.scaled_lr:.4g}"
                   + (f" | resumed at step {self.step}" if self.step else ""))
        result: dict[str, Any] = {"run_dir": str(self.out)}
        self.losses = LossMeter(env.device)
        window = (self.step, time.perf_counter())  # (step, time) where the current img/s window starts
        first_step = self.step
        saved_at, stopped = None, None
        with self._running(), self.step_stream(), self.progress_bar() as bar:
            while self.step < self.stop_step and not stopped:
                epoch = self.step // self.steps_per_epoch
                # a resumed run starts where it stopped in its epoch (the loader skips the batches done)
                self.train_loader.set_epoch(epoch, start_batch=self.step - epoch * self.steps_per_epoch)
                for views, labels in self.train_loader:
                    if self.step == first_step:
                        self._preview(views)
                    loss = self.train_step(views)
                    self.probe_step(labels)
                    self.step += 1
                    bar.update()
                    self.losses.add(loss, self.step)  # steps count from 1, as in the log lines
                    if self.step == first_step + 1:
                        result["first_step_s"] = self._first_step_done(window[1])
                        window = (self.step, time.perf_counter())
                    if self.step % c.log_every == 0 or self.step == self.stop_step:
                        result.update(self._log_interval(window))
                        window = (self.step, time.perf_counter())
                        if self.step < self.stop_step:
                            stopped = self._stop_reason()
                    if self.step == self.stop_step or stopped:
                        break
                if self.step % self.steps_per_epoch == 0:  # a whole epoch
                    done = self.step // self.steps_per_epoch
                    paused = False
                    if c.knn_every and done % c.knn_every == 0 and done < c.epochs and self.step < self.stop_step:
                        result.update(self._knn())
                        paused = True
                    if done % c.ckpt_every == 0:
                        result["checkpoint"] = self._save()
                        saved_at, paused = self.step, True
                    if paused:  # img/s counts training only: restart the window once the GPU is idle (a
                        # restart while the host runs steps ahead of the GPU would charge their time to it)
                        if self.cuda:
                            torch.cuda.synchronize(self.env.device)
                        window = (self.step, time.perf_counter())
            if saved_at != self.step:
                result["checkpoint"] = self._save()
            if stopped:
                return {**result, **self._stopped(stopped), "step": self.step,
                        "epoch": self.step / self.steps_per_epoch}
            if checksum := self._teachers_bit_identical(self.method.teacher):
                self.log.log({"step": self.step, "teacher_checksum": checksum, "teacher_bit_identical": True})
                result["teacher_bit_identical"] = True
            if env.is_main:
                result["backbone"] = str(export_backbone(self.out, self.method.backbone))
            result.update(self._knn())
            result.update(step=self.step, epoch=self.step / self.steps_per_epoch)
            if "knn_top1" in result:
                student = (f", student {result['knn_student_top1']:.2f}% top-5 {result['knn_student_top5']:.2f}%"
                           if "knn_student_top1" in result else "")
                self.print(f"teacher kNN top-1 {result['knn_top1']:.2f}% top-5 {result['knn_top5']:.2f}%{student} "
                           f"(k={c.knn_k}) at step {self.step}")
            return result

    def train_step(self, views: tuple[Tensor, ...]) -> Tensor:
        """One optimisation step and teacher update; returns the loss (on the device, detached)."""
        c = self.config
        self.step_begin()
        set_lr(self.optimizer, lr_at(self.step, self.total_steps, c.scaled_lr, self.warmup_steps))
        with self._autocast():
            loss = self.method(views)
        self._update(loss, momentum=self.momentum_at(self.step))
        return loss.detach().float()

    def momentum_at(self, step: int) -> float:
        """Teacher momentum of step `step`: BYOL's cosine schedule from `momentum` to 1, or constant."""
        c = self.config
        if c.momentum_schedule == "cosine":
            return cosine_momentum(step, self.total_steps, base=c.momentum)
        return c.momentum

    def _log_interval(self, window: tuple[int, float]) -> dict[str, Any]:
        """Read the mean loss since the last line and the teacher statistics (the host sync), check
        them, write one metrics line; img/s over `window` = (first step, its start time)."""
        c = self.config
        steps = self.step - window[0]
        epoch = self.step / self.steps_per_epoch
        loss = float(self._checked(lambda: self.losses.mean(self.step)))
        # the teacher update draws the same masks on every rank: verify it while syncing anyway
        checksum = self._checked(lambda: ddp.check_same_across_ranks(self.method.teacher))
        elapsed = time.perf_counter() - window[1]
        img_s = steps * c.batch_size / elapsed if elapsed > 0 and steps else 0.0
        m = {"step": self.step, "epoch": epoch, "loss": loss,
             "lr": lr_at(self.step - 1, self.total_steps, c.scaled_lr, self.warmup_steps),
             "momentum": self.momentum_at(self.step - 1), **teacher_stats(self.smoother), "img_per_s": img_s}
        if img_s:
            m["eta_s"] = (self.stop_step - self.step) * c.batch_size / img_s
        if checksum is not None:
            m["teacher_checksum"] = list(checksum)
        if self.probe is not None and (probe_loss := self.probe.mean_loss()) is not None:
            m["probe_loss"] = probe_loss
        self.log.log(m)
        self.print(progress_line(m, self.stop_step, c.epochs))
        progress.postfix(loss=loss)
        return {"loss": loss, "img_per_s": img_s}

    # ------------------------------------------------------------------------------ monitoring

    def _knn(self) -> dict[str, float]:
        """Teacher kNN top-1/top-5 (%) on the test split, measured on rank 0 ({} without a test split);
        with `knn_student` also the student's ("knn_student_top1", "knn_student_top5")."""
        from fastse.eval import knn_eval

        out: dict[str, float] = {}
        if self.env.is_main and self.eval_loaders:
            (train_loader, n_train), (test_loader, n_test) = self.eval_loaders
            started = time.perf_counter()
            nets = {"knn": self.method.backbone}
            if self.config.knn_student:
                nets["knn_student"] = self.method.student_backbone
            for name, net in nets.items():
                with self._autocast():
                    if name == "knn" and self.probe is not None:  # the same features, raw for the probe
                        acc = self._knn_and_probe(net, out)
                    else:
                        acc = knn_eval(net, train_loader, test_loader, device=self.env.device, k=self.config.knn_k,
                                       temperature=self.config.knn_temperature, num_train=n_train, num_test=n_test)
                out.update({f"{name}_top1": acc["top1"], f"{name}_top5": acc["top5"]})
            epoch = self.step / self.steps_per_epoch
            self.log.log({"step": self.step, "epoch": epoch, **out, "knn_s": time.perf_counter() - started})
            student = (f" | student top-1 {out['knn_student_top1']:.2f}% top-5 {out['knn_student_top5']:.2f}%"
                       if self.config.knn_student else "")
            probe = f" | online probe top-1 {out['probe_top1']:.2f}%" if "probe_top1" in out else ""
            self.print(f"kNN at epoch {epoch:g}: teacher top-1 {out['knn_top1']:.2f}% top-5 {out['knn_top5']:.2f}%"
                       f"{student}{probe} ({time.perf_counter() - started:.1f} s)")
        ddp.barrier()
        if best := self._keep_best(out, epoch=self.step / self.steps_per_epoch):
            out["best"] = best
        return out

    def _knn_and_probe(self, net: torch.nn.Module, out: dict[str, float]) -> dict[str, float]:
        """kNN top-1/top-5 of `net` (the teacher's backbone) as `knn_eval` measures them, and the online
        probe's top-1 on the same test features (raw, as the probe trains on them) into `out["probe_top1"]`."""
        import torch.nn.functional as F

        from fastse.eval import extract_features, knn_accuracy

        (train_loader, n_train), (test_loader, n_test) = self.eval_loaders
        device = self.env.device
        train_feats, train_labels = extract_features(net, train_loader, device=device, num_samples=n_train,
                                                     normalize=False)
        test_feats, test_labels = extract_features(net, test_loader, device=device, num_samples=n_test,
                                                   normalize=False)
        out["probe_top1"] = self.probe.accuracy(test_feats, test_labels)
        return knn_accuracy(F.normalize(train_feats, dim=1), train_labels, F.normalize(test_feats, dim=1), test_labels,
                            k=self.config.knn_k, temperature=self.config.knn_temperature)

    def _build_probe(self) -> OnlineProbe | None:
        """The online probe (`pretrain.probe`) on rank 0, None elsewhere or where it is off: asked off, or no
        labels (fewer than 2 classes) or no test split to measure it on. Where it is on, every rank's method
        keeps the teacher's features (MoCo's shuffle-BN needs every rank to gather the labels)."""
        c, classes = self.config, int(self.data_record.get("classes", 0))
        wanted = c.online_probe and classes >= 2 and bool(self.eval_loaders)  # eval loaders: rank 0's
        self.probe_on = bool(ddp.broadcast_(torch.tensor([int(wanted)], device=self.env.device)).item())
        if c.online_probe and not self.probe_on:
            self.print("online probe off: " + ("no test/ or val/ split to measure it on" if classes >= 2
                                               else f"{classes} class(es) of labels"))
        self.method.want_features(self.probe_on)
        if not (self.probe_on and self.env.is_main):
            return None
        return OnlineProbe(self.method.backbone.feature_dim, classes, lr=c.probe_lr, device=self.env.device)

    def probe_step(self, labels: Tensor) -> None:
        """The online probe's step (rank 0) on the teacher's features that the last `train_step` kept, with
        this rank's batch `labels` [B] (int64, on the device); its lr follows the backbone's schedule. No host
        sync; every rank calls it (under MoCo's shuffle-BN the features are of other ranks' samples: their
        labels are gathered)."""
        features, index = self.method.features, self.method.feature_index
        if not self.probe_on or features is None:
            return
        if index is not None:
            labels = ddp.all_gather_cat(labels)[index]
        if self.probe is not None:
            c = self.config
            self.probe.step(features, labels, lr_at(self.step, self.total_steps, c.scaled_lr, self.warmup_steps)
                            / c.scaled_lr)
        self.method.features = self.method.feature_index = None

    def _preview(self, views: tuple[Tensor, ...]) -> None:
        """The first batch's views of a few images: `views.png` and the wandb image "views" (`_write_preview`)."""
        recipe = self.train_loader.recipe
        self._write_preview(views, recipe, f"{recipe.name} augmentation at {recipe.size} px: row i is view i of the "
                                           f"first images of the batch of step {self.step + 1}")

    # ----------------------------------------------------------------------------- checkpoints

    def _save(self, best: dict[str, Any] | None = None) -> str:
        """Checkpoint the current step (`_write_checkpoint`), with MoCo's queue, the online probe and the
        epoch; with `best` (every rank alike), the run's best/ checkpoint, the teacher's backbone in it."""
        probe_tensors, probe_meta = self.probe.state() if self.probe is not None else ({}, None)

        def extra() -> dict[str, Any]:
            groups = {"queue": queue} if (queue := self.method.state_tensors()) else {}
            return {**groups, GROUP: probe_tensors} if probe_tensors else groups

        return self._write_checkpoint(
            self.method, extra, best=best, backbone=self.method.backbone if best else None, probe=probe_meta,
            epoch=self.step / self.steps_per_epoch, steps_per_epoch=self.steps_per_epoch, data=self.data_record)

    def _load(self, path: Path, meta: dict) -> None:
        groups, meta = ckpt.load_checkpoint(path, device=self.env.device)  # checksums verified
        if meta["steps_per_epoch"] != self.steps_per_epoch:
            raise ckpt.CheckpointError(f"{path}: saved with {meta['steps_per_epoch']} steps per epoch, this run "
                                       f"has {self.steps_per_epoch} (batch size, data or --limit changed)")
        self.method.student.load_state_dict(groups["student"])
        self.method.teacher.load_state_dict(groups["teacher"])
        for name, t in groups.get("queue", {}).items():
            self.method.get_buffer(name).copy_(t)
        ckpt.optimizer_from_tensors(self.optimizer, groups["optimizer"], meta["optimizer_layout"])
        self.smoother.load_state_dict(meta["smoother"])
        ckpt.set_rng_state(groups["rng"])
        self.step = int(meta["step"])
        if self.probe is not None and (fresh := self.probe.load(groups.get(GROUP), meta.get("probe"))):
            self.print(f"--resume: {fresh}: the online probe starts fresh at step {self.step}")


# --------------------------------------------------------------------------------------- helpers


def checkpoint_bytes(config: PretrainConfig) -> int:
    """About the bytes of one checkpoint of `config`'s run plus its backbone export: the method's
    state (student, teacher, queue), one optimizer buffer per trained parameter (SGD and LARS
    momentum) and the teacher's backbone. Counted on the meta device: no memory, no GPU."""
    with torch.device("meta"):
        method = build_method(config.to_dict())
    trained = [p for p in method.student.parameters() if p.requires_grad]
    return runs.checkpoint_size(method.state_dict().values(), trained, method.backbone.state_dict().values())
