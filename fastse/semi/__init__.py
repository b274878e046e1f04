"""Semi-supervised learning with a smoothed teacher: FixMatch (Sohn et al. 2020) whose EMA model is an
EMA, SE or STS teacher (Huang et al. 2021). `SemiConfig` says what a run is, `train` runs it."""

from fastse.semi.config import PRESETS, SemiConfig, preset
from fastse.semi.fixmatch import FixMatch, fixmatch_loss, fixmatch_lr
from fastse.semi.trainer import SemiTrainer, TrainingError, train

__all__ = ["SemiConfig", "PRESETS", "preset", "FixMatch", "fixmatch_loss", "fixmatch_lr", "SemiTrainer",
           "TrainingError", "train"]
