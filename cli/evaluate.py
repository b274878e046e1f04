"""`fastse eval-linear` and `fastse knn`: evaluate a frozen backbone (a fastse run folder, a
`backbone.safetensors`, or a torchvision ResNet state dict). Results go to the console, to `eval.json`
in the run folder or next to the file given (every result kept with what it measured: `fastse.results`),
and to wandb.
"""

from __future__ import annotations

import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from fastse.results import add_result, is_headline, qualifiers

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")  # fastse.models.resnet.ARCHS (no torch import for --help)


class NotSaved(click.ClickException):
    """A result computed and printed but not saved (a read-only folder): exit 2, as for a user's mistake."""

    exit_code = 2


def _common(fn):
    options = [
        click.option("--checkpoint", required=True, help="Run folder, backbone.safetensors, or a torchvision ResNet "
                     "state dict (.pth / .safetensors; needs --arch)."),
        click.option("--data", required=True, help="Class-folder tree with train/ and test/ (or val/), an archive "
                     "of one, or cifar10/cifar100."),
        click.option("--which", type=click.Choice(("teacher", "student")), default="teacher", show_default=True,
                     help="Which backbone of a run folder."),
        click.option("--arch", type=click.Choice(ARCHS), help="Architecture of a plain state dict."),
        click.option("--cifar-stem/--no-cifar-stem", default=None,
                     help="3x3 first conv of a plain state dict [default: read from conv1's shape]."),
        click.option("--dataset", type=click.Choice(("cifar10", "cifar100", "imagenet")),
                     help="Use its published mean/std [default: measured on the data]."),
        click.option("--limit", type=int, help="Use at most N images of each split (smoke runs)."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--loader", type=click.Choice(("auto", "tensor", "dali")), default="auto", show_default=True),
        click.option("--cache-dir", help="Extracted archives and decoded arrays."),
        click.option("--wandb", type=click.Choice(("auto", "online", "offline", "disabled")), default="auto",
                     show_default=True),
        click.option("--wandb-project", default="fastse", show_default=True),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.command("eval-linear")
@_common
@click.option("--protocol", type=click.Choice(("byol", "moco", "fast")), default="byol", show_default=True,
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
    import torch.distributed as dist

    from fastse.engine import distributed as ddp
    from fastse.eval.linear import get_protocol, linear_eval

    owns_group = not (dist.is_available() and dist.is_initialized())
    try:
        env = ddp.init_distributed(common["device"])  # under torchrun: the standard protocols run data-parallel
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    try:
        backbone, data, device, folder = _setup({**common, "device": str(env.device)}, own=env.is_main)
        try:
            proto = get_protocol(protocol, small=data.small, epochs=epochs, batch_size=batch_size, lr=lr,
                                 copies=copies)
        except ValueError as e:
            raise click.UsageError(_as_flags(str(e))) from None
        echo = click.echo if env.is_main else lambda *_: None
        echo(f"linear eval ({proto.name}: {proto.epochs} epochs, batch {proto.batch_size}, lr {proto.lr} per 256) of "
             f"the {common['which']} backbone of {common['checkpoint']} on {data.num('train')} train / "
             f"{data.num('test')} test images at {data.size} px, {env.world_size} process(es) on {device}")
        log = _runlog(folder, f"linear-{protocol}", common, vars(proto), enabled=env.is_main)
        on_epoch = lambda e, loss: (log.log({"step": e, "epoch": e, "train_loss": loss}),
                                    echo(f"epoch {e}/{proto.epochs}: loss {loss:.4f}"))
        try:
            result = linear_eval(backbone, data, proto, device=device, backend=common["loader"], seed=seed,
                                 on_epoch=on_epoch)
        except (ValueError, ImportError) as e:  # batch vs. data or processes, unreadable images, no DALI
            raise click.UsageError(_as_flags(str(e))) from None
        log.log({"step": proto.epochs, "top1": result["top1"], "top5": result["top5"]})
        log.close()
        if env.is_main:
            _report(folder, protocol, {**result, "world_size": env.world_size}, common)
    finally:
        if owns_group:
            ddp.cleanup()


@click.command("knn")
@_common
@click.option("--k", "k", type=int, default=200, show_default=True, help="Neighbours.")
@click.option("--temperature", type=float, default=0.1, show_default=True)
@click.option("--batch-size", type=int, default=512, show_default=True, help="Images per forward.")
def knn(k: int, temperature: float, batch_size: int, **common: Any) -> None:
    """Weighted kNN classification (cosine similarity) of the test split by the train split's features."""
    from fastse.eval.knn import knn_eval

    if k < 1 or not 0 < temperature < math.inf or batch_size < 1:
        raise click.UsageError(f"--k={k} and --batch-size={batch_size} must be >= 1, --temperature={temperature} "
                               "a finite number > 0")
    backbone, data, device, folder = _setup(common)
    started = time.perf_counter()
    try:
        loaders = [data.loader(s, "test", batch_size=batch_size, device=device, backend=common["loader"])
                   for s in ("train", "test")]
        with _autocast(device):
            acc = knn_eval(backbone.to(device), *loaders, device=device, k=k, temperature=temperature,
                           num_train=data.num("train"), num_test=data.num("test"))
    except (ValueError, ImportError) as e:  # unreadable images, no DALI
        raise click.UsageError(str(e)) from None
    result = {**acc, "k": k, "temperature": temperature, "train_images": data.num("train"),
              "test_images": data.num("test"), "seconds": time.perf_counter() - started}
    log = _runlog(folder, "knn", common, {"k": k, "temperature": temperature})
    log.log({"step": 0, "top1": acc["top1"], "top5": acc["top5"]})
    log.close()
    _report(folder, "knn", result, common)


# --------------------------------------------------------------------------------------- helpers


def _autocast(device):
    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def _setup(common: dict[str, Any], own: bool = True):
    """(backbone, EvalData, device, folder for eval.json), the folder owned (`own`) until the command ends;
    bad input -> UsageError (exit 2)."""
    import torch

    from fastse.checkpoints import CheckpointError
    from fastse.eval.linear import eval_data
    from fastse.eval.load import load_backbone_for_eval

    if common["limit"] is not None and common["limit"] < 1:
        raise click.UsageError(f"--limit={common['limit']} must be >= 1")
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


def _runlog(folder: Path, name: str, common: dict[str, Any], settings: dict[str, Any], enabled: bool = True):
    """A RunLog (wandb, metrics.jsonl) in folder/eval/<name>, or one that does nothing when wandb is off."""
    from fastse.engine.logging import RunLog, wandb_mode

    on = enabled and wandb_mode(common["wandb"]) != "disabled"
    try:
        return RunLog(folder / "eval" / name, {**common, **settings, "eval": name}, wandb=common["wandb"],
                      project=common["wandb_project"], enabled=on)
    except OSError as e:  # a read-only folder: evaluate all the same
        click.echo(f"warning: {folder / 'eval' / name} cannot be written ({e.strerror or e}): no metrics log",
                   err=True)
        return RunLog(folder, {}, enabled=False)


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
