"""What `fastse pretrain` and `fastse semi` share: the engine's flags and how a run is started.

Config errors (bad flags, data, checkpoints, a missing backend) become one usage line naming the
flags (exit 2); a run that stops (`TrainingError`) becomes one error line (exit 1); a run stopped early
by its time limit or a signal, checkpoint written, exits 3.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import click

from fastse.choices import COMPILE_MODES, WANDB_MODES

EXIT_STOPPED = 3  # stopped early with a checkpoint (--time-limit, SIGTERM, SIGUSR1, Ctrl-C): --resume continues

_ENGINE_OPTIONS = (
    click.option("--device", help="auto, cpu, cuda or cuda:N [default: auto]."),
    click.option("--compile/--no-compile", default=None, help="torch.compile the models [default: on CUDA]."),
    click.option("--compile-mode", type=click.Choice(COMPILE_MODES),
                 help="torch.compile mode (reduce-overhead: CUDA graphs) [default: the preset's, else default]."),
    click.option("--deterministic/--no-deterministic", default=None, help="Deterministic kernels."),
    click.option("--seed", type=int),
    click.option("--cache-dir",
                 help="Extracted archives and decoded arrays [default: $FASTSE_CACHE or ~/.cache/fastse]."),
    click.option("--wandb", type=click.Choice(WANDB_MODES),
                 help="[default: auto: $WANDB_MODE, else online with credentials, else offline]"),
    click.option("--wandb-project", help="[default: $WANDB_PROJECT, else fastse]"),
    click.option("--wandb-entity", help="User or team [default: $WANDB_ENTITY, else wandb's default]."),
    click.option("--wandb-group", help="Group of runs, e.g. a study's EMA and STS runs in one view."),
    click.option("--wandb-tags", metavar="TAG,TAG", help="Comma-separated tags."),
    click.option("--wandb-name", help="Run name [default: the run folder's name]."),
    click.option("--time-limit", type=float, metavar="MINUTES",
                 help="Stop after this many minutes of training with a checkpoint (exit 3; --resume continues). "
                      "SIGTERM, SIGUSR1 and Ctrl-C stop the same way."),
    click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in --out."),
    click.option("--config", "config_file", metavar="FILE",
                 help="Settings from a TOML or JSON file, or a run folder's run.json (the run's settings: the same "
                      "training); flags override it, and it overrides the preset (--preset, else its own `preset`)."),
    click.option("--print-config", is_flag=True,
                 help="Print the resolved settings as TOML (what --config reads) and exit without training."),
)


def engine_options(fn: Callable) -> Callable:
    """Add the flags every training command has (device, compile, determinism, seed, cache, wandb, resume)."""
    for option in reversed(_ENGINE_OPTIONS):
        fn = option(fn)
    return fn


def run_training(make_config: Callable[[dict[str, Any], str | None], Any], make_trainer: Callable[[Any, bool], Any],
                 flags: dict[str, Any], resume: bool, *, settings: type, report: Iterable[str] = ("checkpoint",)
                 ) -> None:
    """Build the config from the settings of the `--config` file (read for the dataclass `settings`) and
    the flags given over them, `make_config(given, preset named by the file)`, and the trainer from it
    (errors: exit 2); with `--print-config` print the config and return. Train (a stop: exit 1; stopped
    early with a checkpoint: exit 3) and echo the `report` entries of the result on the main process."""
    from fastse.engine.runs import TrainingError
    from fastse.settings import config_toml, read_config_file

    flags = dict(flags)
    config_file, print_config = flags.pop("config_file", None), flags.pop("print_config", False)
    given = {k: v for k, v in flags.items() if v is not None}
    try:
        file_preset, from_file = read_config_file(config_file, settings) if config_file else (None, {})
    except ValueError as e:  # names the file and the key
        raise click.UsageError(str(e)) from None
    try:
        config = make_config({**from_file, **given}, file_preset)
        if print_config:
            config.validate()
            ctx = click.get_current_context()
            click.echo(config_toml(config, title=f"{ctx.command_path}: the resolved settings (--config reads them)"),
                       nl=False)
            return
        trainer = make_trainer(config, resume)  # the trainer validates the config first
    except (ValueError, ImportError) as e:
        raise click.UsageError(as_flags(str(e), flags)) from None
    try:
        result = trainer.fit()
    except TrainingError as e:
        raise click.ClickException(str(e)) from None
    if trainer.env.is_main:
        for key in report:
            if result.get(key):
                click.echo(f"{key}: {result[key]}")
    if result.get("stopped"):  # a time limit or a stop signal: checkpointed, not finished
        raise SystemExit(EXIT_STOPPED)


def as_flags(message: str, fields: Iterable[str]) -> str:
    """Config fields in `message` written as the flags that set them: keep_prob=1.5 -> --keep-prob=1.5."""
    fields = set(fields)
    return re.sub(r"\b([a-z_]+)=", lambda m: f"--{m[1].replace('_', '-')}=" if m[1] in fields else m[0], message)
