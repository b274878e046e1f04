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

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # = fastse.config's
WANDB_MODES = ("auto", "online", "offline", "disabled")
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
                 help="[default: auto: online with credentials, else offline]"),
    click.option("--time-limit", type=float, metavar="MINUTES",
                 help="Stop after this many minutes of training with a checkpoint (exit 3; --resume continues). "
                      "SIGTERM, SIGUSR1 and Ctrl-C stop the same way."),
    click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in --out."),
)


def engine_options(fn: Callable) -> Callable:
    """Add the flags every training command has (device, compile, determinism, seed, cache, wandb, resume)."""
    for option in reversed(_ENGINE_OPTIONS):
        fn = option(fn)
    return fn


def run_training(make_config: Callable[[dict[str, Any]], Any], make_trainer: Callable[[Any, bool], Any],
                 flags: dict[str, Any], resume: bool, *, report: Iterable[str] = ("checkpoint",)) -> None:
    """Build the config from the flags given and the trainer from it (errors: exit 2), train (a stop:
    exit 1; stopped early with a checkpoint: exit 3) and echo the `report` entries of the result on the
    main process."""
    from fastse.engine.runs import TrainingError

    given = {k: v for k, v in flags.items() if v is not None}
    try:
        trainer = make_trainer(make_config(given), resume)  # the trainer validates the config first
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
