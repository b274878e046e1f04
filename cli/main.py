"""The `fastse` command line: a thin layer over the library."""

from __future__ import annotations

import sys

import click
from fastse.cli.evaluate import eval_linear, knn
from fastse.cli.pretrain import pretrain
from fastse.cli.report import report
from fastse.cli.semi import semi


def _version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from fastse import __version__
    from fastse.engine.logging import git_commit

    commit = git_commit()
    click.echo(f"fastse {__version__}" + (f" (commit {commit})" if commit else ""))
    ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_version,
              help="Show the version (and the git commit of a source checkout) and exit.")
def main() -> None:
    """fastse: fast, faithful student-teacher learning (EMA / Spatial Ensemble / STS teachers)."""


@main.group()
def data() -> None:
    """Inspect and prepare data sets."""


@data.command("check")
@click.argument("path")
@click.option("--split", default=None, help="Check PATH/SPLIT (e.g. train) instead of PATH.")
@click.option("--deep", is_flag=True, help="Decode every image (slow) instead of reading headers and end markers.")
def data_check(path: str, split: str | None, deep: bool) -> None:
    """Validate a class-folder tree (or an archive of one, or cifar10/cifar100) and say what it holds: its
    images, the folder links not followed, and the image sizes with what the size rule makes of them."""
    from fastse.pipelines.datasets import DataError, resolve_data, scan_image_folder
    from fastse.pipelines.sizes import image_sizes

    try:
        root = resolve_data(path)
        splits = [split] if split else [s for s in ("train", "val", "test") if (root / s).is_dir()] or [None]
        classes = None  # the first split's: every other split must have the same class folders
        for name in splits:
            index = scan_image_folder(root, split=name, deep=deep, classes=classes)
            classes = classes or index.classes
            click.echo(f"{name or '.'}: {index.summary()}")
            for link, why in index.unfollowed:
                click.echo(f"  {link}: {why}")
            click.echo("  " + image_sizes(index).describe().replace("\n", "\n  "))
    except DataError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)


main.add_command(pretrain)
main.add_command(eval_linear)
main.add_command(knn)
main.add_command(semi)
main.add_command(report)

if __name__ == "__main__":
    main()
