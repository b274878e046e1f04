"""What a pretraining run is: one dataclass, the paper's and CIFAR recipes as presets, and the checks.

`PretrainConfig` fields left as None take the method's default from the paper (METHOD_DEFAULTS):
BYOL keeps a teacher fragment with probability 0.7 and smooths with a per-iteration cosine momentum
from 0.99; MoCo v2 keeps with 0.5 at a constant 0.999. `lr` is per 256 images and scaled linearly
with the global batch (`scaled_lr`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fastse.choices import (  # the lists of choices, also importable from here
    ARCHS,
    AUGMENTATIONS,
    BUFFER_MODES,
    COMPILE_MODES,
    DATASETS,
    DTYPES,
    GRANULARITIES,
    LOADERS,
    METHODS,
    MOMENTUM_SCHEDULES,
    MONITORS,
    OPTIMIZERS,
    RULES,
    WANDB_MODES,
)
from fastse.settings import RunSettings, check_choice, renamed
from fastse.wandb_settings import check_wandb_settings

# px: a larger crop is a typo (256 two-view crops at 4096 px are 96 GiB of fp32 input alone)
MAX_IMAGE_SIZE = 4096

METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    # BYOL (Grill et al. 2020) with STS (Huang et al. 2021): projector 4096-256, predictor 4096-256
    "byol": dict(keep_prob=0.7, momentum=0.99, momentum_schedule="cosine",
                 proj_hidden_dim=4096, proj_dim=256, pred_hidden_dim=4096, queue_size=0, temperature=0.0),
    # MoCo v2 (Chen et al. 2020): MLP head 2048-128, InfoNCE at 0.2, 65,536 queued keys
    "mocov2": dict(keep_prob=0.5, momentum=0.999, momentum_schedule="constant",
                   proj_hidden_dim=2048, proj_dim=128, pred_hidden_dim=0, queue_size=65536, temperature=0.2),
}


@dataclass
class PretrainConfig(RunSettings):
    """One self-supervised pretraining run (`fastse pretrain`). Units: epochs over the train split,
    `batch_size` images per step over all ranks, `lr` per 256 images, `*_every` in epochs except
    `log_every` (steps)."""

    # what is learned
    method: str = "byol"                # byol | mocov2
    arch: str = "resnet50"              # torchvision ResNet
    cifar_stem: bool = False            # 3x3/1 first conv, no max-pool (32 px images)
    proj_hidden_dim: int | None = None  # projector (BYOL) / MLP head (MoCo) hidden width
    proj_dim: int | None = None         # projection size
    pred_hidden_dim: int | None = None  # BYOL predictor hidden width
    queue_size: int | None = None       # MoCo: queued keys
    temperature: float | None = None    # MoCo: InfoNCE temperature
    # data
    data: str | None = None             # class-folder tree, archive, or cifar10/cifar100 (torchvision)
    dataset: str | None = None          # cifar10 | cifar100 | imagenet: published mean/std; the data if none given
    image_size: int | None = None       # px; default: the images' side when <= 64, else 224
    limit: int | None = None            # use at most this many images of each split (smoke runs)
    loader: str = "auto"                # auto | tensor | dali
    augmentation: str | None = None     # byol | mocov2 | simclr two-view recipe; None: the method's own
    cache_dir: str | None = None        # extracted archives, decoded arrays ($FASTSE_CACHE)
    # optimisation
    epochs: int = 200
    batch_size: int = 256
    lr: float = 0.05
    weight_decay: float = 1e-4
    optimizer: str = "sgd"              # sgd | lars (LARS: no decay or adaptation of biases and BN)
    sgd_momentum: float = 0.9
    warmup_epochs: float = 0.0          # linear warmup, then cosine to 0, per step
    # teacher
    rule: str = "sts"                   # ema | se | sts (called smoothing before; RENAMED)
    keep_prob: float | None = None      # P(keep a teacher fragment), se/sts
    granularity: str = "tensor"         # tensor | channel | element
    momentum: float | None = None       # teacher momentum (base of the cosine schedule)
    momentum_schedule: str | None = None  # cosine (to 1 at the last step) | constant
    buffers: str = "keep"               # teacher BN statistics: keep (its own) | copy | ema
    # engine
    device: str = "auto"                # auto (cuda when present) | cpu | cuda
    dtype: str = "bf16"                 # autocast dtype on CUDA (CPU runs fp32)
    channels_last: bool = True
    compile: bool | None = None         # torch.compile student and teacher; None: on CUDA
    compile_mode: str = "default"       # torch.compile mode; reduce-overhead replays CUDA graphs
    syncbn: bool = False                # SyncBatchNorm in student and teacher (DDP)
    seed: int = 0
    deterministic: bool = False         # deterministic kernels (bit-identical resume)
    max_steps: int | None = None        # stop after this many steps in total (schedules keep `epochs`)
    time_limit: float | None = None     # minutes of training in this process, then a checkpoint and exit 3
    # monitoring and output
    knn_every: int = 10                 # teacher kNN on the test split every N epochs (0: at the end only)
    knn_k: int = 200
    knn_temperature: float = 0.1
    knn_student: bool = False           # the kNN checks also measure the student's backbone (teacher vs student)
    online_probe: bool = True           # a linear head on the teacher features, trained on the labels (pretrain.probe)
    probe_lr: float = 0.05              # its SGD learning rate, on the backbone's warmup-cosine schedule
    monitor: str = "knn_top1"           # the best/ checkpoint is the best by: knn_top1 | probe_top1 | none
    log_every: int = 50                 # steps between metrics lines (the only host syncs)
    ckpt_every: int = 10                # epochs between checkpoints (and one at the end)
    keep_ckpts: int = 3
    wandb: str = "auto"                 # auto (online with credentials, else offline) | online | offline | disabled
    wandb_project: str | None = None    # default: $WANDB_PROJECT, else "fastse"
    wandb_entity: str | None = None     # default: $WANDB_ENTITY, else wandb's default entity
    wandb_group: str | None = None      # e.g. one study, to compare its EMA and STS runs in one view
    wandb_tags: str | None = None       # comma-separated, e.g. "sts,cifar10"
    wandb_name: str | None = None       # default: the run folder's name
    out: str = "runs/pretrain"

    def __post_init__(self) -> None:
        for key, value in METHOD_DEFAULTS.get(self.method, {}).items():
            if getattr(self, key) is None:
                setattr(self, key, value)

    @property
    def scaled_lr(self) -> float:
        """The peak learning rate: `lr` x batch_size / 256."""
        return self.lr * self.batch_size / 256

    def replace(self, **changes: Any) -> PretrainConfig:
        """A copy with `changes` (old names of RENAMED taken as the new ones); a changed method re-fills the
        fields it leaves at None."""
        changes = renamed(changes)
        if "method" in changes and changes["method"] != self.method:
            base = {k: None for k in METHOD_DEFAULTS.get(self.method, {}) if k not in changes}
            changes = {**base, **changes}
        return dataclasses.replace(self, **changes)

    def validate(self, world_size: int = 1) -> PretrainConfig:
        """Raise ValueError with one clear line for an impossible setting; return self."""
        self.check_run()
        check_choice("method", self.method, METHODS)
        check_choice("arch", self.arch, ARCHS)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("rule", self.rule, RULES)
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_choice("momentum_schedule", self.momentum_schedule, MOMENTUM_SCHEDULES)
        check_choice("buffers", self.buffers, BUFFER_MODES)
        check_choice("loader", self.loader, LOADERS)
        if self.augmentation is not None:
            check_choice("augmentation", self.augmentation, AUGMENTATIONS)
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("compile_mode", self.compile_mode, COMPILE_MODES)
        check_choice("wandb", self.wandb, WANDB_MODES)
        check_wandb_settings(self)
        if self.dataset is not None:
            check_choice("dataset", self.dataset, DATASETS)
        if not self.data_spec:
            raise ValueError("data=None and dataset=None: give a class-folder tree, an archive, cifar10 or cifar100")
        if self.data is None and self.dataset == "imagenet":
            raise ValueError("dataset=imagenet cannot be downloaded: give data= (the ImageNet class-folder tree)")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device={self.device!r}: use auto, cpu, cuda or cuda:N")
        for name in ("keep_prob", "momentum"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value} is outside [0, 1]")
        for name in ("epochs", "batch_size", "log_every", "keep_ckpts", "ckpt_every", "knn_k",
                     "proj_hidden_dim", "proj_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        check_choice("monitor", self.monitor, MONITORS)
        if self.monitor == "probe_top1" and not self.online_probe:
            raise ValueError("monitor='probe_top1' needs the online probe: online_probe=False")
        for name in ("lr", "knn_temperature", "probe_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("weight_decay", "warmup_epochs", "knn_every", "sgd_momentum", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} must be shorter than epochs={self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps} must be >= 1")
        if self.time_limit is not None and not self.time_limit > 0:
            raise ValueError(f"time_limit={self.time_limit} must be > 0 (minutes)")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit={self.limit} must be >= 1")
        if self.image_size is not None and not 8 <= self.image_size <= MAX_IMAGE_SIZE:
            raise ValueError(f"image_size={self.image_size} px is outside [8, {MAX_IMAGE_SIZE}]")
        if self.batch_size % world_size:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by the {world_size} processes")
        if self.method == "byol" and self.pred_hidden_dim < 1:
            raise ValueError(f"pred_hidden_dim={self.pred_hidden_dim} must be >= 1 for BYOL")
        if self.method == "mocov2":
            if not self.temperature > 0:
                raise ValueError(f"temperature={self.temperature} must be > 0")
            if self.queue_size < self.batch_size:
                raise ValueError(f"queue_size={self.queue_size} must hold at least one batch ({self.batch_size} keys)")
        return self


# The CIFAR presets follow lightly's BYOL benchmark (SGD rescaled to our loss) and the MoCo authors' CIFAR-10
# demo; why, and the momentum / lr sweeps behind their values: docs/BENCHMARKS.md, "Where the CIFAR presets
# come from".
PRESETS: dict[str, PretrainConfig] = {
    "byol-cifar10": PretrainConfig(
        method="byol", arch="resnet18", cifar_stem=True, dataset="cifar10", epochs=200, batch_size=512,
        lr=0.03, weight_decay=2e-3, momentum=0.9, knn_every=20, ckpt_every=20, compile_mode="reduce-overhead"),
    "mocov2-cifar10": PretrainConfig(
        method="mocov2", arch="resnet18", cifar_stem=True, dataset="cifar10", epochs=200, batch_size=512,
        lr=0.03, weight_decay=5e-4, momentum=0.99, queue_size=4096, knn_every=20, ckpt_every=20),
    # ImageNet: the recipes of the Spatial Ensemble paper (SPATIAL_ENSEMBLE.md, "Hyperparameters")
    "byol-imagenet": PretrainConfig(
        method="byol", arch="resnet50", dataset="imagenet", epochs=200, batch_size=256,
        lr=0.05, weight_decay=1e-4, warmup_epochs=10, knn_every=20, ckpt_every=5),
    "mocov2-imagenet": PretrainConfig(
        method="mocov2", arch="resnet50", dataset="imagenet", epochs=200, batch_size=256,
        lr=0.03, weight_decay=1e-4, knn_every=20, ckpt_every=5),
}


def preset(name: str, **overrides: Any) -> PretrainConfig:
    """The preset `name` with `overrides` applied (unknown names fail with the list)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)
