"""`decouple list`: the registered losses, samplers and heads."""

from __future__ import annotations

from typing import Optional

import click

KINDS = ("losses", "samplers", "heads")


@click.command("list")
@click.argument("kind", required=False, type=click.Choice(KINDS))
def list_cmd(kind: Optional[str]) -> None:
    """List losses, samplers or heads (all three without KIND), one line each."""
    from decouple.stage_two.heads import head_families, list_heads
    from decouple.stage_two.losses import list_losses
    from decouple.stage_two.samplers import list_samplers

    listings = {"losses": lambda: list_losses(head_families()), "samplers": list_samplers, "heads": list_heads}
    kinds = [kind] if kind else list(KINDS)
    for index, name in enumerate(kinds):
        entries = listings[name]()
        if len(kinds) > 1:
            click.echo(("\n" if index else "") + f"{name}:")
        width = max(len(entry) for entry, _ in entries)
        for entry, description in entries:
            click.echo(f"{'  ' if len(kinds) > 1 else ''}{entry.ljust(width)}  {description}")
