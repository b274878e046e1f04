"""`fastse semi`: FixMatch with an EMA, SE or STS teacher; a thin layer over `SemiConfig`.

Settings come from the preset (if any), then from the `--config` file (if any), then from the flags
given; `--print-config` prints them. Under torchrun every process
runs this command with the same flags.
"""

from __future__ import annotations

import click
from fastse.cli.training import engine_options, run_training

# the lists fastse.semi.config checks (fastse.choices: no torch import for `fastse --help`)
from fastse.choices import GRANULARITIES, RULES, SEMI_BUFFER_MODES, SEMI_DATASETS, SEMI_MONITORS
from fastse.choices import SEMI_PRESETS as PRESET_NAMES

CHOICES = {  # config field -> the choices of its flag
    "dataset": SEMI_DATASETS,
    "rule": RULES,
    "granularity": GRANULARITIES,
    "buffers": SEMI_BUFFER_MODES,
    "monitor": SEMI_MONITORS,
}


def _choice(name: str) -> click.Choice:
    return click.Choice(CHOICES[name])


@click.command("semi")
@click.option("--preset", type=click.Choice(PRESET_NAMES),
              help="FixMatch's CIFAR recipe (the default is fixmatch-cifar10's); other flags override it.")
@click.option("--data", help="Class-folder tree with train/ and test/ (or val/), an archive of one, or cifar10/100 "
              "[default with --resume: the run's].")
@click.option("--dataset", type=_choice("dataset"), help="Use its published mean/std (and download it if no --data).")
@click.option("--num-labels", type=int, help="Labeled training images, as many of each class [default: 4000].")
@click.option("--split-seed", type=int, help="Seed of the labeled split [default: --seed].")
@click.option("--depth", type=int, help="WRN depth [default: 28].")
@click.option("--widen", type=int, help="WRN widening factor [default: 2; fixmatch-cifar100: 8].")
@click.option("--labeled-batch", type=int, help="Labeled images a step, all processes [default: 64].")
@click.option("--mu", type=int, help="Unlabeled images per labeled one [default: 7].")
@click.option("--threshold", type=float, help="Confidence a pseudo-label needs [default: 0.95].")
@click.option("--lambda-u", type=float, help="Weight of the unlabeled loss [default: 1].")
@click.option("--teacher-targets/--student-targets", default=None,
              help="Pseudo-labels from the smoothed teacher, or from the student as in FixMatch [default].")
@click.option("--total-steps", type=int, help="K: the lr schedule is lr x cos(7 pi k / 16 K) [default: 2^20].")
@click.option("--max-steps", type=int, help="Stop after N steps in total (checkpointed; the schedule keeps K).")
@click.option("--lr", type=float, help="[default: 0.03]")
@click.option("--weight-decay", type=float, help="Not on BN and biases [default: 5e-4; fixmatch-cifar100: 1e-3].")
@click.option("--rule", "--smoothing", "rule", type=_choice("rule"),
              help="Teacher update rule (--smoothing: its old name) [default: sts].")
@click.option("--keep-prob", type=float, help="P(keep a teacher fragment), se/sts [default: 0.5].")
@click.option("--momentum", type=float, help="Teacher momentum [default: 0.999].")
@click.option("--granularity", type=_choice("granularity"), help="Fragment size [default: tensor].")
@click.option("--buffers", type=_choice("buffers"), help="Teacher BN statistics from the student's [default: copy].")
@click.option("--eval-every", type=int, help="Steps between test-set evaluations [default: 1024].")
@click.option("--log-every", type=int, help="Steps between metrics lines [default: 100].")
@click.option("--ckpt-every", type=int, help="Steps between checkpoints [default: 4096].")
@click.option("--monitor", type=_choice("monitor"),
              help="best/ holds the checkpoint of the best evaluation by this test top-1 [default: teacher_acc].")
@click.option("--out", help="Run folder: metrics.jsonl, labeled_split.json, views.png, checkpoints/, best/ "
              "[default: runs/semi].")
@engine_options
def semi(preset: str | None, resume: bool, **flags) -> None:
    """Semi-supervised FixMatch whose evaluation model is an EMA / SE / STS teacher."""
    from fastse.semi.config import SemiConfig
    from fastse.semi.config import preset as get_preset
    from fastse.semi.trainer import SemiTrainer

    def make_config(given, file_preset=None):
        name = preset or file_preset
        return get_preset(name, **given) if name else SemiConfig(**given)

    run_training(make_config, lambda config, resume: SemiTrainer(config, resume=resume), flags, resume,
                 settings=SemiConfig)
