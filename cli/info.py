"""`decouple info`: describe a feature file."""

from __future__ import annotations

import json
from typing import Any, List, Optional

import click

from cli.options import shot_threshold_options


@click.command("info")
@click.argument("path", metavar="F.h5")
@shot_threshold_options
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--health/--no-health", default=True, show_default=True,
              help="Check each held-out split against train (nearest-neighbour cosines, 1-NN accuracy, "
                   "near-duplicates, leak test).")
@click.option("--duplicates", "duplicates_path", default=None, metavar="OUT.csv",
              help="Write the near-duplicate pairs as split,index,train_index,cosine.")
def info(path: str, groups: str, many_threshold: int, few_threshold: int, as_json: bool, health: bool,
         duplicates_path: Optional[str]) -> None:
    """Per split N and D, the classes, training counts and shot groups of F.h5,
    and the health of its held-out splits (are any leaky?)."""
    from decouple.errors import ConfigError
    from decouple.features import read_features, summarize

    if duplicates_path is not None and not health:
        raise ConfigError("--duplicates needs the split health check; leave out --no-health")
    feature_set = read_features(path)
    summary = summarize(feature_set, groups=groups, many_threshold=many_threshold, few_threshold=few_threshold)
    report = None
    if health:
        from decouple.split_health import split_health

        report = split_health(feature_set)
        summary["split_health"] = report.splits
        summary["split_health_criteria"] = {**report.criteria, "notes": report.notes}
        if duplicates_path is not None:
            report.write_duplicates(duplicates_path)
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
        + (f" (train profile {summary['train_profile']})" if summary.get("train_profile") else "")
    )
    reference = summary.get("reference_counts")
    if reference is not None:
        lines.append(
            f"reference counts: max {reference['max']}, min {reference['min']} "
            f"({reference['source'] or 'no source recorded'}); the shot groups come from them"
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
    if report is not None:
        lines.extend(_health_lines(report, width))
        if duplicates_path is not None:
            pairs = sum(len(found) for found in report.pairs.values())
            lines.append(f"wrote {pairs} near-duplicate pair(s) to {duplicates_path}")
    click.echo("\n".join(lines))


def _health_lines(report: Any, width: int) -> List[str]:
    """A few lines on the held-out splits' health (no line starts with a bare
    split name, so the N x D table above stays the only one that does)."""
    if not report.splits:
        return [f"split health: {'; '.join(report.notes)}"]
    lines = [
        "split health, against train (cosine to the nearest training image: median [5%, 95%]; "
        "1-NN accuracy; near-duplicates of training images):"
    ]
    for name, split in report.splits.items():
        quantiles = split["nn_cosine_quantiles"]
        lines.append(
            f"  {(name + ':').ljust(width + 1)}  {split['nn_cosine_median']:.3f} [{quantiles['0.05']:.3f}, "
            f"{quantiles['0.95']:.3f}]  1-NN {split['one_nn_accuracy']:.1%}  near-duplicates "
            f"{split['near_duplicates']} ({split['near_duplicate_fraction']:.1%})  "
            f"{'FLAGGED' if split['flagged'] else 'ok'}"
        )
    for name in report.flagged:
        lines.append(f"  why {name} is flagged: " + "; ".join(report.splits[name]["reasons"]))
    lines.extend(f"  note: {note}" for note in report.notes)
    return lines
