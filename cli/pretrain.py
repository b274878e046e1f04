"""`fastse pretrain`: BYOL / MoCo v2 with an EMA, SE or STS teacher; a thin layer over `PretrainConfig`.

Settings come from the preset (if any), then from the `--config` file (if any), then from the flags
given; `--print-config` prints them. Under torchrun every process
runs this command with the same flags.
"""

from __future__ import annotations

import click
from fastse.cli.training import engine_options, run_training

# the lists fastse.pretrain.config checks (fastse.choices: no torch import for `fastse --help`)
from fastse import choices

PRESET_NAMES, MONITORS = choices.PRETRAIN_PRESETS, choices.MONITORS
CHOICES = {  # config field -> the choices of its flag
    "method": choices.METHODS,
    "arch": choices.ARCHS,
    "dataset": choices.DATASETS,
    "loader": choices.LOADERS,
    "augmentation": choices.AUGMENTATIONS,
    "optimizer": choices.OPTIMIZERS,
    "rule": choices.RULES,
    "granularity": choices.GRANULARITIES,
    "momentum_schedule": choices.MOMENTUM_SCHEDULES,
}


def _choice(name: str) -> click.Choice:
    return click.Choice(CHOICES[name])


@click.command("pretrain")
@click.option("--preset", type=click.Choice(PRESET_NAMES), help="A paper or CIFAR recipe; other flags override it.")
@click.option("--method", type=_choice("method"), help="[default: byol]")
@click.option("--data", help="Class-folder tree (train/ and test/ or val/), archive of one, or cifar10/cifar100 "
              "[default with --resume: the run's].")
@click.option("--dataset", type=_choice("dataset"), help="Use its published mean/std (and download it if no --data).")
@click.option("--arch", type=_choice("arch"), help="torchvision ResNet [default: resnet50; CIFAR presets resnet18].")
@click.option("--cifar-stem/--no-cifar-stem", default=None, help="3x3 first conv, no max-pool (32 px images).")
@click.option("--image-size", type=int, help="Training crop in px [default: median image side if <= 64, else 224].")
@click.option("--limit", type=int, help="Use at most N images of each split (smoke runs).")
@click.option("--epochs", type=int)
@click.option("--batch-size", type=int, help="Global batch (all processes).")
@click.option("--lr", type=float, help="Learning rate per 256 images (scaled by batch/256).")
@click.option("--weight-decay", type=float)
@click.option("--optimizer", type=_choice("optimizer"))
@click.option("--warmup-epochs", type=float)
@click.option("--rule", "--smoothing", "rule", type=_choice("rule"),
              help="Teacher update rule (--smoothing: its old name) [default: sts].")
@click.option("--keep-prob", type=float, help="P(keep a teacher fragment) [default: 0.7 BYOL, 0.5 MoCo].")
@click.option("--granularity", type=_choice("granularity"), help="Fragment size [default: tensor].")
@click.option("--momentum", type=float, help="Teacher momentum [default: 0.99 BYOL, 0.999 MoCo].")
@click.option("--momentum-schedule", type=_choice("momentum_schedule"),
              help="[default: cosine BYOL, constant MoCo]")
@click.option("--proj-hidden-dim", type=int,
              help="Projector (BYOL) / MLP head (MoCo) hidden width [default: 4096 BYOL, 2048 MoCo].")
@click.option("--proj-dim", type=int, help="Projection size [default: 256 BYOL, 128 MoCo].")
@click.option("--pred-hidden-dim", type=int, help="BYOL predictor hidden width [default: 4096].")
@click.option("--queue-size", type=int, help="MoCo keys in the queue.")
@click.option("--temperature", type=float, help="MoCo InfoNCE temperature [default: 0.2].")
@click.option("--loader", type=_choice("loader"), help="Input pipeline backend [default: auto].")
@click.option("--augmentation", type=_choice("augmentation"),
              help="Two-view augmentation recipe [default: the method's own].")
@click.option("--syncbn/--no-syncbn", default=None, help="SyncBatchNorm in student and teacher.")
@click.option("--max-steps", type=int, help="Stop after N steps in total (checkpointed; schedules keep --epochs).")
@click.option("--knn-every", type=int, help="Epochs between kNN checks of the teacher (0: at the end only).")
@click.option("--knn-student/--no-knn-student", default=None,
              help="The kNN checks also measure the student's backbone [default: the teacher's only].")
@click.option("--online-probe/--no-online-probe", default=None,
              help="A linear head on the teacher's features trained on the labels during pretraining, its test "
                   "top-1 at every kNN check [default: on where the data has labels and a test split].")
@click.option("--probe-lr", type=float, help="The online probe's SGD learning rate [default: 0.05].")
@click.option("--monitor", type=click.Choice(MONITORS),
              help="best/ holds the checkpoint best by this, measured at the kNN checks [default: knn_top1].")
@click.option("--log-every", type=int, help="Steps between metrics lines.")
@click.option("--ckpt-every", type=int, help="Epochs between checkpoints.")
@click.option("--out", help="Run folder: metrics.jsonl, checkpoints/, backbone.safetensors [default: runs/pretrain].")
@engine_options
def pretrain(preset: str | None, resume: bool, **flags) -> None:
    """Self-supervised pretraining (BYOL or MoCo v2) with an EMA / SE / STS teacher."""
    from fastse.pretrain.config import PretrainConfig
    from fastse.pretrain.config import preset as get_preset
    from fastse.pretrain.trainer import Trainer

    def make_config(given, file_preset=None):
        name = preset or file_preset
        if not name:
            return PretrainConfig(**given)
        base = get_preset(name)
        if given.get("method", base.method) != base.method:
            raise ValueError(f"--method {given['method']} contradicts --preset {name} (a {base.method} "
                             f"recipe); use --preset {given['method']}-{name.split('-', 1)[1]}")
        return base.replace(**given)

    run_training(make_config, lambda config, resume: Trainer(config, resume=resume), flags, resume,
                 settings=PretrainConfig, report=("checkpoint", "backbone", "best"))
