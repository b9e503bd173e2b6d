"""`decouple export`: tables (csv, markdown, latex, json, html) and plots from a results database."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import click

FORMATS = ("csv", "markdown", "latex", "json", "html")
LAYOUTS = ("default", "study")


def _split_commas(values: Sequence[str]) -> Optional[list]:
    items = [item.strip() for value in values for item in value.split(",") if item.strip()]
    return items or None


@click.command("export")
@click.option("--db", default="results.db", show_default=True, metavar="FILE", help="Results database of a sweep.")
@click.option("--format", "format_", type=click.Choice(FORMATS), default="markdown", show_default=True)
@click.option("--out", "-o", default=None, metavar="FILE", help="Write here (atomically) instead of stdout.")
@click.option("--layout", type=click.Choice(LAYOUTS), default="default", show_default=True,
              help="study: one table per (backbone, training profile), one row per method (the stage-one method "
                   "for the fine-tuned network's own head), and for balanced test, long-tailed test, head, middle "
                   "and tail the test NLL (T = 1), top-1 and macro-F1, mean ± std over seeds (no ± for end-to-end "
                   "and training-free rows), then (markdown, latex, html) the recorded stage-one runs; --plots "
                   "then draws tail against balanced accuracy per backbone. It takes no --metrics, --splits, "
                   "--rows, --cells or --ci.")
@click.option("--summary/--cells", default=None,
              help="Summary table (mean ± std over seeds per method) or one row per cell and split. "
                   "Default: per cell for csv and json, summary for markdown, latex and html.")
@click.option("--metrics", multiple=True, metavar="LIST",
              help="Table columns, comma-separated: top1, top5, macro_f1, mean_class_acc, many, medium, few, "
                   "many_f1, medium_f1, few_f1 (mean per-class F1 of each group), "
                   "ece, nll (calibration after temperature scaling fitted on val; lower is better; "
                   "NLL in nats, never in %), ece_raw, nll_raw (the same before scaling), "
                   "many_nll, medium_nll, few_nll (NLL at T = 1 over each group's images) "
                   "[default: top1,macro_f1,many,medium,few].")
@click.option("--splits", multiple=True, metavar="LIST",
              help="Evaluated splits, comma-separated, e.g. test,test_lt [default: every split but val].")
@click.option("--rows", multiple=True, metavar="LIST",
              help="Fields naming a table row, from features, head, loss, sampler [default: those that vary].")
@click.option("--features", "features", multiple=True, metavar="NAME", help="Only this feature file (name or path); repeatable.")
@click.option("--head", "heads", multiple=True, metavar="NAME", help="Only this head; repeatable.")
@click.option("--loss", "losses", multiple=True, metavar="NAME", help="Only this loss ('none' for ncm/knn); repeatable.")
@click.option("--sampler", "samplers", multiple=True, metavar="NAME", help="Only this sampler; repeatable.")
@click.option("--seed", "seeds", multiple=True, type=int, metavar="N", help="Only this seed; repeatable.")
@click.option("--percent/--fraction", default=True, show_default=True, help="Show accuracies (and ECE) in % or as fractions; NLL is shown in nats either way.")
@click.option("--digits", default=1, show_default=True, type=click.IntRange(0, 6), help="Decimals shown in tables (NLL: two more under --percent).")
@click.option("--ci", is_flag=True,
              help="Add a bootstrap confidence interval [low, high] to every label-based metric (not ECE/NLL): "
                   "the split's images resampled within each class from the stored per-image predictions; "
                   "a summary row's interval is that of its mean over seeds. Needs a database written by "
                   "this version (results schema 2).")
@click.option("--resamples", default=1000, show_default=True, type=click.IntRange(10, 100_000),
              help="Bootstrap resamples for --ci.")
@click.option("--ci-seed", default=0, show_default=True, type=click.IntRange(0), help="Seed of the --ci resamples.")
@click.option("--confidence", default=0.95, show_default=True, type=click.FloatRange(0.5, 0.999),
              help="Confidence level of the --ci intervals.")
@click.option("--plots", "plots_dir", default=None, metavar="DIR",
              help="Also write per-class-accuracy and many/medium/few plots (PNG and SVG) here.")
def export(
    db: str,
    format_: str,
    layout: str,
    out: Optional[str],
    summary: Optional[bool],
    metrics: Tuple[str, ...],
    splits: Tuple[str, ...],
    rows: Tuple[str, ...],
    features: Tuple[str, ...],
    heads: Tuple[str, ...],
    losses: Tuple[str, ...],
    samplers: Tuple[str, ...],
    seeds: Tuple[int, ...],
    percent: bool,
    digits: int,
    ci: bool,
    resamples: int,
    ci_seed: int,
    confidence: float,
    plots_dir: Optional[str],
) -> None:
    """Tables and plots from a sweep's results database."""
    from decouple.errors import DecoupleError
    from decouple.atomic import write_text_atomic
    from decouple.study.layouts import render
    from decouple.study.store import ResultStore, load_records

    records = load_records(
        db,
        features=features or None,
        heads=heads or None,
        losses=losses or None,
        samplers=samplers or None,
        seeds=seeds or None,
        # Per-image predictions: what --ci resamples, and part of a cell in the per-cell JSON.
        # summary None: json defaults to per cell; the study layout never uses predictions.
        predictions=layout == "default" and (ci or (format_ == "json" and not summary)),
    )
    if not records:
        raise DecoupleError(f"{db}: no cells match the selection (--features/--head/--loss/--sampler/--seed)")
    runs = []
    if layout == "study":
        with ResultStore.open_existing(db) as store:
            runs = store.runs()
    text = render(
        records,
        format=format_,
        summary=summary,
        metrics=_split_commas(metrics),
        splits=_split_commas(splits),
        rows=_split_commas(rows),
        percent=percent,
        digits=digits,
        ci=ci,
        resamples=resamples,
        ci_seed=ci_seed,
        confidence=confidence,
        layout=layout,
        runs=runs,
    )
    if plots_dir is not None:
        from decouple.study.plots import export_plots, export_study_plots

        if layout == "study":
            written = export_study_plots(records, plots_dir)
        else:
            written = export_plots(records, plots_dir, splits=_split_commas(splits), rows=_split_commas(rows))
        click.echo(f"wrote {len(written)} plot files to {plots_dir}", err=True)
    if out is None:
        click.echo(text, nl=False)
    else:
        write_text_atomic(out, text)
        click.echo(f"wrote {out}", err=True)
