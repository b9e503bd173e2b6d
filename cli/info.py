"""`decouple info`: describe a feature file."""

from __future__ import annotations

import json

import click

from cli.options import shot_threshold_options


@click.command("info")
@click.argument("path", metavar="F.h5")
@shot_threshold_options
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def info(path: str, groups: str, many_threshold: int, few_threshold: int, as_json: bool) -> None:
    """Per split N and D, the classes, training counts and shot groups of F.h5."""
    from decouple.features import read_features, summarize

    summary = summarize(
        read_features(path), groups=groups, many_threshold=many_threshold, few_threshold=few_threshold
    )
    if as_json:
        click.echo(json.dumps(summary))
        return
    counts, sizes = summary["train_counts"], summary["groups"]
    width = max(len(name) for name in summary["splits"])
    lines = [
        f"{summary['path']}  (backbone {summary['backbone']})",
        f"classes: {summary['num_classes']}",
        f"{'split'.ljust(width)}  {'N':>8}  {'D':>6}",
    ]
    for name, split in summary["splits"].items():
        lines.append(f"{name.ljust(width)}  {split['n']:>8}  {split['dim']:>6}")
    lines.append(
        f"training counts: max {counts['max']}, min {counts['min']}, "
        f"imbalance factor {counts['imbalance_factor']:.1f}"
    )
    if groups == "thirds":
        lines.append(
            f"shot groups (thirds of the classes by training count): many {sizes['many']}, "
            f"medium {sizes['medium']}, few {sizes['few']}"
        )
    else:
        lines.append(
            f"shot groups: many {sizes['many']} (> {many_threshold}), "
            f"medium {sizes['medium']} ({few_threshold}..{many_threshold}), few {sizes['few']} (< {few_threshold})"
        )
    click.echo("\n".join(lines))
