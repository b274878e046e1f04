"""Self-supervised pretraining with a smoothed teacher: BYOL (Grill et al. 2020) and MoCo v2 (Chen et al.
2020) whose momentum teacher is an EMA, SE or STS teacher (Huang et al. 2021). `PretrainConfig` says what a run
is, `train` runs it; the sibling of `fastse.semi` over the shared run engine (`fastse.engine`)."""

from fastse.pretrain.config import METHOD_DEFAULTS, PRESETS, PretrainConfig, preset
from fastse.pretrain.data import build_data
from fastse.pretrain.probe import OnlineProbe
from fastse.pretrain.trainer import Trainer, TrainingError, checkpoint_bytes, train

__all__ = ["PretrainConfig", "METHOD_DEFAULTS", "PRESETS", "preset", "build_data", "OnlineProbe", "Trainer",
           "TrainingError", "checkpoint_bytes", "train"]
