"""`decouple predict`: classify image files with a saved model."""

from __future__ import annotations

import sys
from typing import Optional, Tuple

import click


@click.command("predict")
@click.argument("model_path", metavar="MODEL")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option("--out", "-o", default=None, metavar="FILE", help="Write the rows here (atomically) instead of stdout.")
@click.option("--format", "format_", type=click.Choice(["csv", "jsonl"]), default="csv", show_default=True,
              help="csv: path, label_1, probability_1, ..., error; jsonl: one JSON object per image.")
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True,
              help="Classes listed per image, most probable first.")
@click.option("--split", default=None, metavar="NAME", help="Only the rows of this split of a CSV manifest (e.g. test).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--device", default=None, help="torch device [cuda if available, else cpu].")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Image-decoding processes.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr [when stderr is a terminal].")
@click.option("--target-prior", default=None, metavar="uniform|train|FILE",
              help="The class prior of the images to classify: uniform (balanced), train (as long-tailed as the "
                   "training set) or a JSON / CSV file of class weights (class name,weight). The scores move "
                   "from the prior the method assumes, which the model file records [that prior].")
def predict(
    model_path: str, inputs: Tuple[str, ...], out: Optional[str], format_: str, top_k: int, split: Optional[str],
    batch_size: int, device: Optional[str], workers: int, progress: Optional[bool], target_prior: Optional[str],
) -> None:
    """Classify images with a model file from `decouple save-model`.

    INPUT is image files, folders (searched recursively) or CSV manifests
    (path[,label[,split]]; with labels, the top-1 accuracy is printed). Each
    image gets a row with its top-k classes and their calibrated
    probabilities; an unreadable image gets a row with an error and the run
    goes on. Exit code 0 when every image was classified, 1 when some failed.
    """
    from decouple.deploy.model import load_model
    from decouple.deploy.predict import PredictSummary, collect_inputs, write_predictions

    model = load_model(model_path, device=device).set_target_prior(target_prior)
    items = collect_inputs(inputs, split=split)
    summary = PredictSummary()
    show = sys.stderr.isatty() if progress is None else progress
    write_predictions(
        model, items, out, format=format_, top_k=top_k, batch_size=batch_size, workers=workers,
        progress=show, summary=summary,
    )
    click.echo(str(summary), err=True)
    if summary.failed:
        sys.exit(1)
