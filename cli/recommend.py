"""`decouple recommend`: which method to use, with its uncertainty."""

from __future__ import annotations

import json
from typing import Optional

import click

# decouple.study.bootstrap.BOOTSTRAP_METRICS, spelled out so that --help imports no numpy.
METRICS = ("mean_class_acc", "top1", "top5", "macro_f1", "many", "medium", "few", "many_f1", "medium_f1", "few_f1")


@click.command("recommend")
@click.option("--db", default="results.db", show_default=True, metavar="FILE", help="Results database of a sweep.")
@click.option("--features", default=None, metavar="NAME",
              help="The feature file (name or path) whose cells to compare; needed when the database holds several.")
@click.option("--metric", type=click.Choice(METRICS), default="mean_class_acc", show_default=True,
              help="Val metric the methods are ranked by (mean_class_acc, few, macro_f1, ...).")
@click.option("--resamples", default=1000, show_default=True, type=click.IntRange(10, 100_000),
              help="Bootstrap resamples of the val and test images.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Seed of the resamples.")
@click.option("--confidence", default=0.95, show_default=True, type=click.FloatRange(0.5, 0.999),
              help="Confidence level of the intervals and of 'not separable'.")
@click.option("--show", default=10, show_default=True, type=click.IntRange(1),
              help="Methods listed as not separable from the best (--json lists all).")
@click.option("--json", "as_json", is_flag=True, help="Print the recommendation as one JSON object.")
def recommend(db: str, features: Optional[str], metric: str, resamples: int, seed: int, confidence: float,
              show: int, as_json: bool) -> None:
    """Which method to use: the val-best method, the methods val cannot tell
    from it, and its test scores, each with a bootstrap interval.

    \b
    The methods are ranked by their mean val score over seeds, the choice
    `decouple save-model --select val` makes. A method is not separable
    from the best when the paired bootstrap interval of their val difference
    (the val images resampled within each class) reaches 0. The best
    method's test scores and its gain over linear / ce / instance are
    reported once, never used to choose. A warning says when val is too
    small to separate the top methods, and what size would.
    Reads the per-image predictions a sweep stores; refits nothing.
    """
    from decouple.study.recommend import describe, recommend as make_recommendation

    found = make_recommendation(db, features=features, metric=metric, resamples=resamples, seed=seed,
                                confidence=confidence)
    if as_json:
        click.echo(json.dumps(found.to_json(), allow_nan=False))
        return
    click.echo(describe(found, shown=show))
