"""`fastse eval-linear` and `fastse knn`: evaluate a frozen backbone (a fastse run folder, a
`backbone.safetensors`, or a torchvision ResNet state dict). Results go to the console, to `eval.json`
in the run folder or next to the file given (every result kept with what it measured: `fastse.results`),
and to wandb: into the run folder's own wandb run where it has one, else a run of their own
(`fastse.engine.logging.EvalLog`).
"""

from __future__ import annotations

import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from fastse.choices import ARCHS, DATASETS, LINEAR_PROTOCOLS, LOADERS, WANDB_MODES, WHICH  # no torch import for --help
from fastse.results import add_result, is_headline, qualifiers


class NotSaved(click.ClickException):
    """A result computed and printed but not saved (a read-only folder): exit 2, as for a user's mistake."""

    exit_code = 2


def _common(fn):
    options = [
        click.option("--checkpoint", required=True, help="Run folder, backbone.safetensors, or a torchvision ResNet "
                     "state dict (.pth / .safetensors; needs --arch)."),
        click.option("--data", required=True, help="Class-folder tree with train/ and test/ (or val/), an archive "
                     "of one, or cifar10/cifar100."),
        click.option("--which", type=click.Choice(WHICH), default="teacher", show_default=True,
                     help="Which backbone of a run folder."),
        click.option("--arch", type=click.Choice(ARCHS), help="Architecture of a plain state dict."),
        click.option("--cifar-stem/--no-cifar-stem", default=None,
                     help="3x3 first conv of a plain state dict [default: read from conv1's shape]."),
        click.option("--dataset", type=click.Choice(DATASETS),
                     help="Use its published mean/std [default: measured on the data]."),
        click.option("--limit", type=int, help="Use at most N images of each split (smoke runs)."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--loader", type=click.Choice(LOADERS), default="auto", show_default=True),
        click.option("--cache-dir", help="Extracted archives and decoded arrays."),
        click.option("--wandb", type=click.Choice(WANDB_MODES), default="auto",
                     show_default=True, help="auto: $WANDB_MODE, else online with credentials, else offline. A run "
                     "folder's results go into its own wandb run; the flags below name a run of the evaluation's own "
                     "(a file, or a run folder trained without wandb)."),
        click.option("--wandb-project", help="[default: $WANDB_PROJECT, else fastse]"),
        click.option("--wandb-entity", help="[default: $WANDB_ENTITY, else wandb's default]"),
        click.option("--wandb-group"),
        click.option("--wandb-tags", metavar="TAG,TAG", help="Comma-separated tags."),
        click.option("--wandb-name", help="[default: the folder or file name and the evaluation]"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.command("eval-linear")
@_common
@click.option("--protocol", type=click.Choice(LINEAR_PROTOCOLS), default="byol", show_default=True,
              help="byol: BN+Linear, lr 0.2, cosine, 80 epochs; moco: Linear, lr 30, steps at 60/80 of 100 epochs; "
              "fast: features extracted once, head trained on them.")
@click.option("--epochs", type=int, help="[default: the protocol's]")
@click.option("--batch-size", type=int, help="[default: the protocol's]")
@click.option("--lr", type=float, help="Learning rate per 256 images [default: the protocol's].")
@click.option("--copies", type=int, help="fast: augmented copies of the train split [default: 0].")
@click.option("--seed", type=int, default=0, show_default=True)
def eval_linear(protocol: str, epochs: int | None, batch_size: int | None, lr: float | None, copies: int | None,
                seed: int, **common: Any) -> None:
    """Linear evaluation of a frozen backbone: top-1/top-5 on the test split."""
    from fastse.distributed import is_initialized
    from fastse.engine import launch
    from fastse.engine.progress import EpochReport, Progress
    from fastse.engine.progress import echo as say
    from fastse.eval.linear import get_protocol, linear_eval

    owns_group = not is_initialized()
    try:
        env = launch.init_distributed(common["device"])  # under torchrun: the standard protocols run data-parallel
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    try:
        backbone, data, device, folder = _setup({**common, "device": str(env.device)}, own=env.is_main)
        try:
            proto = get_protocol(protocol, small=data.small, epochs=epochs, batch_size=batch_size, lr=lr,
                                 copies=copies)
        except ValueError as e:
            raise click.UsageError(_as_flags(str(e))) from None
        echo = say if env.is_main else lambda *_: None
        echo(f"linear eval ({proto.name}: {proto.epochs} epochs, batch {proto.batch_size}, lr {proto.lr} per 256) of "
             f"the {common['which']} backbone of {common['checkpoint']} on {data.num('train')} train / "
             f"{data.num('test')} test images at {data.size} px, {env.world_size} process(es) on {device}")
        log = _evallog(folder, f"linear_{protocol}", common, vars(proto), enabled=env.is_main)
        report = EpochReport(proto.epochs)
        losses: dict[int, float] = {}

        def on_test(e: int, acc: dict[str, float]) -> None:  # every few epochs: a line, a point of the curve
            log.epoch({"epoch": e, "train_loss": losses[e], "test_top1": acc["top1"], "test_top5": acc["top5"]})
            echo(f"linear {proto.name}: epoch {e}/{proto.epochs} | loss {losses[e]:.4f} | test top-1 "
                 f"{acc['top1']:.2f}% | eta {report.eta(e)}")

        try:
            with Progress(proto.epochs, unit="epoch", desc=f"linear {proto.name}", enabled=env.is_main) as bar:
                on_epoch = lambda e, loss: (losses.__setitem__(e, loss), report.tick(e), bar.update(),
                                            bar.postfix(loss=loss))
                result = linear_eval(backbone, data, proto, device=device, backend=common["loader"], seed=seed,
                                     on_epoch=on_epoch, test_every=report.every, on_test=on_test)
        except (ValueError, ImportError) as e:  # batch vs. data or processes, unreadable images, no DALI
            raise click.UsageError(_as_flags(str(e))) from None
        log.result({"top1": result["top1"], "top5": result["top5"]})
        log.close()
        if env.is_main:
            _report(folder, protocol, {**result, "world_size": env.world_size}, common)
    finally:
        if owns_group:
            launch.cleanup()


@click.command("knn")
@_common
@click.option("--k", "k", type=int, default=200, show_default=True, help="Neighbours.")
@click.option("--temperature", type=float, default=0.1, show_default=True)
@click.option("--batch-size", type=int, default=512, show_default=True, help="Images per forward.")
def knn(k: int, temperature: float, batch_size: int, **common: Any) -> None:
    """Weighted kNN classification (cosine similarity) of the test split by the train split's features."""
    from fastse.engine.amp import autocast
    from fastse.eval.knn import knn_eval

    if k < 1 or not 0 < temperature < math.inf or batch_size < 1:
        raise click.UsageError(f"--k={k} and --batch-size={batch_size} must be >= 1, --temperature={temperature} "
                               "a finite number > 0")
    backbone, data, device, folder = _setup(common)
    started = time.perf_counter()
    try:
        loaders = [data.loader(s, "test", batch_size=batch_size, device=device, backend=common["loader"])
                   for s in ("train", "test")]
        with autocast(device):
            acc = knn_eval(backbone.to(device), *loaders, device=device, k=k, temperature=temperature,
                           num_train=data.num("train"), num_test=data.num("test"))
    except (ValueError, ImportError) as e:  # unreadable images, no DALI
        raise click.UsageError(str(e)) from None
    result = {**acc, "k": k, "temperature": temperature, "train_images": data.num("train"),
              "test_images": data.num("test"), "seconds": time.perf_counter() - started}
    log = _evallog(folder, "knn", common, {"k": k, "temperature": temperature})
    log.result({"top1": acc["top1"], "top5": acc["top5"]})
    log.close()
    _report(folder, "knn", result, common)


# --------------------------------------------------------------------------------------- helpers


def _setup(common: dict[str, Any], own: bool = True):
    """(backbone, EvalData, device, folder for eval.json), the folder owned (`own`) until the command ends;
    bad input -> UsageError (exit 2)."""
    import torch

    from fastse.checkpoints import CheckpointError
    from fastse.eval.linear import eval_data
    from fastse.eval.load import load_backbone_for_eval

    if common["limit"] is not None and common["limit"] < 1:
        raise click.UsageError(f"--limit={common['limit']} must be >= 1")
    _check_wandb(common)
    device = common["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise click.UsageError(f"--device {device}: CUDA is not available")
    path = Path(common["checkpoint"]).expanduser()
    folder = path if path.is_dir() else path.parent
    if own:
        _own(folder)
    try:
        backbone = load_backbone_for_eval(path, which=common["which"], arch=common["arch"],
                                          cifar_stem=common["cifar_stem"])
        data = eval_data(common["data"], dataset=common["dataset"], limit=common["limit"],
                         cache_dir=common["cache_dir"])
    except (CheckpointError, ValueError, ImportError, OSError) as e:  # DataError is a ValueError
        raise click.UsageError(str(e)) from None
    return backbone, data, torch.device(device), folder


def _own(folder: Path) -> None:
    """Own `folder`, where eval.json goes, until the command ends: UsageError (exit 2) while another
    process (a training run, an evaluation) owns it. A folder that cannot be written is evaluated all the
    same: `_report` prints the result, then says where it could not be saved."""
    from fastse.runlock import FolderInUse, RunLock

    try:
        lock = RunLock(folder)
    except FolderInUse as e:
        raise click.UsageError(str(e)) from None
    except OSError:  # read-only, or missing (then the checkpoint is named as missing)
        return
    click.get_current_context().with_resource(lock)


_NAMING = ("wandb_project", "wandb_entity", "wandb_group", "wandb_tags", "wandb_name")  # of an evaluation's own run


def _check_wandb(common: dict[str, Any]) -> None:
    """Bad --wandb-* values (or WANDB_MODE): UsageError (exit 2), before any work."""
    from types import SimpleNamespace

    from fastse.cli.training import as_flags

    from fastse.wandb_settings import check_wandb_settings

    try:
        check_wandb_settings(SimpleNamespace(**{k: common[k] for k in ("wandb", *_NAMING)}))
    except ValueError as e:
        raise click.UsageError(as_flags(str(e), _NAMING)) from None


def _evallog(folder: Path, kind: str, common: dict[str, Any], settings: dict[str, Any], enabled: bool = True):
    """The `EvalLog` of result `kind` ("knn", "linear_byol", ...; "_student" added for the student): into
    the wandb run of a run folder that has one, else a run of its own; metrics.jsonl in folder/eval/<kind>.
    One that does nothing when wandb is off, and (with a warning) where the folder cannot be written: the
    result is evaluated all the same."""
    from fastse.engine.logging import EvalLog, read_wandb_run
    from fastse.wandb_settings import wandb_tags

    checkpoint = Path(common["checkpoint"]).expanduser()
    key = kind + ("_student" if common["which"] == "student" else "")
    log_dir = folder / "eval" / kind.replace("_", "-", 1)
    naming = [f"--{f.replace('_', '-')}" for f in _NAMING if common[f] is not None]
    if enabled and naming and checkpoint.is_dir() and (recorded := read_wandb_run(checkpoint)):
        click.echo(f"note: the result goes into the run's own wandb run {recorded.get('project')}/{recorded['id']}: "
                   f"{', '.join(naming)} not used", err=True)
    try:
        return EvalLog(key, {**common, **settings, "eval": key}, log_dir=log_dir,
                       run_folder=checkpoint if checkpoint.is_dir() else None, wandb=common["wandb"],
                       project=common["wandb_project"], entity=common["wandb_entity"], group=common["wandb_group"],
                       tags=wandb_tags(common["wandb_tags"]),
                       name=common["wandb_name"] or f"{checkpoint.stem or checkpoint.name}-{key}", enabled=enabled)
    except OSError as e:  # a read-only folder: evaluate all the same
        click.echo(f"warning: {log_dir} cannot be written ({e.strerror or e}): no metrics log", err=True)
        return EvalLog(key, {}, log_dir=log_dir, enabled=False)


def _report(folder: Path, key: str, result: dict[str, Any], common: dict[str, Any]) -> None:
    entry = {**result, "which": common["which"], "checkpoint": str(common["checkpoint"]), "data": str(common["data"]),
             "limit": common["limit"], "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    line = f"{key}: top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}% ({result['seconds']:.1f} s)"
    try:
        path = add_result(folder, key, entry)
    except OSError as e:  # a read-only folder: the result, then where it could not be saved
        click.echo(line)
        raise NotSaved(f"{folder / 'eval.json'}: the result could not be saved there ({e.strerror or e})") from None
    aside = "" if is_headline(entry) else f" ({qualifiers(entry)}: kept; the report tables the teacher's on all data)"
    click.echo(f"{line} -> {path}{aside}")


def _as_flags(message: str) -> str:
    for name in ("epochs", "batch_size", "lr", "copies"):
        message = message.replace(f"{name}=", f"--{name.replace('_', '-')}=")
    return message
