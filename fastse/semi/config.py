"""What a FixMatch run is: one dataclass, the CIFAR recipes of FixMatch as presets, and the checks.

The defaults are FixMatch's CIFAR-10 recipe (Sohn et al. 2020) with the smoothed model of Huang et
al. 2021 (STS, keep_prob 0.5, momentum 0.999): WRN-28-2, 64 labeled + 7 x 64 unlabeled images a
step, threshold 0.95, lambda_u 1, SGD Nesterov lr 0.03, weight decay 5e-4, lr x cos(7 pi k / 16 K)
with K = 2^20 steps.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fastse.choices import COMPILE_MODES, DTYPES, GRANULARITIES, RULES, WANDB_MODES
from fastse.choices import SEMI_BUFFER_MODES as BUFFER_MODES  # the teacher's BN statistics come from the student
from fastse.choices import SEMI_DATASETS as DATASETS
from fastse.choices import SEMI_MONITORS as MONITORS  # what the best/ checkpoint is chosen by (test top-1, %)
from fastse.settings import RunSettings, renamed
from fastse.wandb_settings import check_wandb_settings


@dataclass
class SemiConfig(RunSettings):
    """One FixMatch run (`fastse semi`). Units: steps; `labeled_batch` images a step over all ranks
    (and `mu` x as many unlabeled ones)."""

    # data
    data: str | None = None             # class-folder tree with train/ and test/ (or val/), archive, cifar10/cifar100
    dataset: str | None = None          # cifar10 | cifar100: published mean/std; the data if none given
    num_labels: int = 4000              # labeled training images, the same number of each class
    split_seed: int | None = None       # draws the labeled images; None: `seed`
    cache_dir: str | None = None        # extracted archives, decoded arrays ($FASTSE_CACHE)
    # model: WRN-depth-widen
    depth: int = 28
    widen: int = 2
    # FixMatch
    labeled_batch: int = 64
    mu: int = 7                         # unlabeled images per labeled one in a step
    threshold: float = 0.95             # confidence a pseudo-label needs
    lambda_u: float = 1.0               # weight of the unlabeled loss
    teacher_targets: bool = False       # pseudo-labels from the smoothed model (else the student, as FixMatch)
    # optimisation
    total_steps: int = 2**20            # K: the length of the lr schedule
    max_steps: int | None = None        # stop after this many steps in total (the schedule keeps total_steps)
    time_limit: float | None = None     # minutes of training in this process, then a checkpoint and exit 3
    lr: float = 0.03
    weight_decay: float = 5e-4          # not on BatchNorm parameters and biases
    sgd_momentum: float = 0.9           # Nesterov
    # smoothed model (teacher)
    rule: str = "sts"                   # ema | se | sts (called smoothing before: fastse.settings.RENAMED)
    keep_prob: float = 0.5              # P(keep a teacher fragment), se/sts
    momentum: float = 0.999
    granularity: str = "tensor"         # tensor | channel | element
    buffers: str = "copy"               # teacher BN statistics: copy | ema of the student's
    # engine
    device: str = "auto"                # auto (cuda when present) | cpu | cuda | cuda:N
    dtype: str = "bf16"                 # autocast dtype on CUDA (CPU runs fp32)
    channels_last: bool = True
    compile: bool | None = None         # torch.compile student, teacher and loss; None: on CUDA
    compile_mode: str = "default"       # torch.compile mode; reduce-overhead replays CUDA graphs
    seed: int = 0
    deterministic: bool = False         # deterministic kernels (bit-identical resume)
    # monitoring and output
    eval_every: int = 1024              # steps between test-set evaluations of teacher and student
    log_every: int = 100                # steps between metrics lines (the only host syncs of training)
    ckpt_every: int = 4096              # steps between checkpoints (and one at the end)
    keep_ckpts: int = 3
    monitor: str = "teacher_acc"        # best/ is the best evaluation by: teacher_acc | student_acc | none
    wandb: str = "auto"                 # auto (online with credentials, else offline) | online | offline | disabled
    wandb_project: str | None = None    # default: $WANDB_PROJECT, else "fastse"
    wandb_entity: str | None = None     # default: $WANDB_ENTITY, else wandb's default entity
    wandb_group: str | None = None      # e.g. one study, to compare its EMA and STS runs in one view
    wandb_tags: str | None = None       # comma-separated, e.g. "sts,cifar10"
    wandb_name: str | None = None       # default: the run folder's name
    out: str = "runs/semi"

    @property
    def unlabeled_batch(self) -> int:
        return self.labeled_batch * self.mu

    def replace(self, **changes: Any) -> SemiConfig:
        """A copy with `changes` (old names of fastse.settings.RENAMED taken as the new ones)."""
        return dataclasses.replace(self, **renamed(changes))

    def validate(self, world_size: int = 1) -> SemiConfig:
        """Raise ValueError with one clear line for an impossible setting; return self."""
        self.check_run()
        for name, choices in (("rule", RULES), ("granularity", GRANULARITIES), ("buffers", BUFFER_MODES),
                              ("dtype", DTYPES), ("wandb", WANDB_MODES),
                              ("compile_mode", COMPILE_MODES), ("monitor", MONITORS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {', '.join(choices)}")
        check_wandb_settings(self)
        if self.dataset is not None and self.dataset not in DATASETS:
            raise ValueError(f"dataset={self.dataset!r} is not one of {', '.join(DATASETS)}")
        if not self.data_spec:
            raise ValueError("data=None and dataset=None: give a class-folder tree, an archive, cifar10 or cifar100")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device={self.device!r}: use auto, cpu, cuda or cuda:N")
        for name in ("keep_prob", "momentum", "threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} is outside [0, 1]")
        for name in ("num_labels", "widen", "labeled_batch", "mu", "total_steps", "eval_every", "log_every",
                     "ckpt_every", "keep_ckpts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("lambda_u", "weight_decay", "sgd_momentum", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.split_seed is not None and self.split_seed < 0:
            raise ValueError(f"split_seed={self.split_seed} must be >= 0")
        if self.depth < 10 or (self.depth - 4) % 6:
            raise ValueError(f"depth={self.depth}: a Wide ResNet is 6n+4 layers deep (10, 16, 22, 28, ...)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps} must be >= 1")
        if self.time_limit is not None and not self.time_limit > 0:
            raise ValueError(f"time_limit={self.time_limit} must be > 0 (minutes)")
        if self.labeled_batch % world_size:
            raise ValueError(f"labeled_batch={self.labeled_batch} is not divisible by the {world_size} processes")
        return self


PRESETS: dict[str, SemiConfig] = {
    # FixMatch (RandAugment) as published: WRN-28-2, weight decay 5e-4, 4,000 labels
    "fixmatch-cifar10": SemiConfig(dataset="cifar10"),
    # WRN-28-8 (23.4 M parameters), weight decay 1e-3, 10,000 labels
    "fixmatch-cifar100": SemiConfig(dataset="cifar100", widen=8, weight_decay=1e-3, num_labels=10000),
}


def preset(name: str, **overrides: Any) -> SemiConfig:
    """The preset `name` with `overrides` applied (unknown names fail with the list)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)
