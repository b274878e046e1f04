"""`fastse report`: tables and plots of run folders; a thin layer over `fastse.report`."""

from __future__ import annotations

import click


@click.command("report")
@click.argument("run_dirs", nargs=-1, required=True, metavar="RUN_DIR...")
@click.option("--out", default="report", show_default=True, help="Folder for report.md and the PNG plots.")
@click.option("--title", default="fastse results", show_default=True, help="Heading of report.md.")
def report(run_dirs: tuple[str, ...], out: str, title: str) -> None:
    """Tables (mean ± std across seeds, one row per setting) and accuracy plots of the run folders of
    `fastse pretrain` / `fastse semi` (with their eval.json); prints the markdown, writes OUT/report.md.

    Runs that differ only in the seed form one row; pretraining and FixMatch runs, and each
    pretraining method, get tables of their own."""
    from fastse.report import ReportError, write_report

    try:
        path, text = write_report(run_dirs, out, title=title)
    except ReportError as e:
        raise click.UsageError(str(e)) from None
    click.echo(text)
    click.echo(f"report: {path} (plots beside it)", err=True)
