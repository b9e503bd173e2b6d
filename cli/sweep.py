"""`decouple sweep CONFIG.yaml`: run a grid of heads x losses x samplers x seeds, resumably."""

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
@click.option("--dry-run", is_flag=True, help="Check the config and feature files, print what would run, run nothing.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar on stderr (default: when stderr is a terminal).")
def sweep(config: str, db: Optional[str], device: Optional[str], dry_run: bool, progress: Optional[bool]) -> None:
    """Run every cell of the sweep CONFIG not yet in the results database.

    The config is checked whole before anything runs. Each finished cell is
    stored at once, in its own transaction: a rerun skips finished cells, and
    Ctrl-C keeps everything finished so far.
    """
    from decouple.study.config import load_config
    from decouple.study.plan import plan_sweep
    from decouple.study.runner import SweepInterrupted, run_sweep

    sweep_config = load_config(config)
    overrides = {"device": device} if device else {}
    if dry_run:
        plan = plan_sweep(sweep_config, db=db, train_overrides=overrides)
        click.echo(
            f"{len(plan.cells)} cells: {len(plan.finished)} already in {plan.db}, {len(plan.pending)} to run"
        )
        for planned in plan.pending:
            click.echo(f"  {planned.label}")
        return
    if progress is None:
        progress = sys.stderr.isatty()
    try:
        summary = run_sweep(sweep_config, db=db, train_overrides=overrides, progress=progress)
    except SweepInterrupted as exc:
        click.echo(f"decouple sweep: {exc}", err=True)
        sys.exit(130)
    click.echo(str(summary))
