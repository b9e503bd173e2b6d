"""`decouple sweep CONFIG.yaml`: run a config's stage-one runs, then its grid of
heads x losses x samplers x seeds, resumably."""

from __future__ import annotations

import sys
from typing import Optional

import click


@click.command("sweep")
@click.argument("config", type=click.Path(dir_okay=True, path_type=str))
@click.option("--db", default=None, metavar="FILE",
              help="Results database (default: the config's `db`, else results.db).")
@click.option("--device", default=None, metavar="DEVICE",
              help="Training device, e.g. cpu or cuda:0 (default: cuda when visible). Not part of a cell's key.")
@click.option("--dry-run", is_flag=True,
              help="Check the config and feature files, print the stage-one runs and cells that would run, "
                   "run nothing.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar on stderr (default: when stderr is a terminal).")
def sweep(config: str, db: Optional[str], device: Optional[str], dry_run: bool, progress: Optional[bool]) -> None:
    """Run every stage-one run and cell of the sweep CONFIG not yet made.

    The config is checked whole before anything runs. With a `stage_one:`
    section its missing runs come first (one feature file each, resumable,
    on several GPUs each under torchrun); a failed run is reported, the rest
    go on, and the exit code is 1. Each finished cell is stored at once, in
    its own transaction: a rerun skips finished runs and cells, and Ctrl-C
    keeps everything finished so far.
    """
    from decouple.study.config import load_config
    from decouple.study.runner import SweepInterrupted, describe_plan, run_sweep

    sweep_config = load_config(config)
    overrides = {"device": device} if device else {}
    if dry_run:
        for line in describe_plan(sweep_config, db=db, train_overrides=overrides):
            click.echo(line)
        return
    if progress is None:
        progress = sys.stderr.isatty()
    log = lambda message: click.echo(message, err=True)  # stdout holds only the summary
    try:
        summary = run_sweep(sweep_config, db=db, train_overrides=overrides, progress=progress, log=log)
    except SweepInterrupted as exc:
        click.echo(f"decouple sweep: {exc}", err=True)
        sys.exit(130)
    click.echo(str(summary))
    if summary.failed_runs:
        sys.exit(1)
