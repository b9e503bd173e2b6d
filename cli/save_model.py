"""`decouple save-model`: the val-best cell of a sweep as one model file."""

from __future__ import annotations

from typing import Optional

import click

# decouple.deploy.save.MODEL_FORMATS, spelled out so that --help imports no torch.
MODEL_FORMATS = ("decouple", "torchscript", "onnx")


@click.command("save-model")
@click.option("--db", default="results.db", show_default=True, metavar="FILE", help="Results database of a sweep.")
@click.option("--features", default=None, metavar="NAME",
              help="The feature file (name or path) whose cells to choose from; needed when the database holds several.")
@click.option("--select", "select_split", type=click.Choice(["val"]), default="val", show_default=True,
              help="Split the method is chosen on; never test.")
@click.option("--metric", default="mean_class_acc", show_default=True, metavar="NAME",
              help="Val metric to maximise, e.g. mean_class_acc, top1, macro_f1, few.")
@click.option("--out", "-o", "out", required=True, metavar="FILE", help="Model file to write (atomically).")
@click.option("--format", "format_", type=click.Choice(MODEL_FORMATS), default="decouple", show_default=True,
              help="decouple: the model file `decouple predict` and decouple.load_model read; torchscript / "
                   "onnx: a portable file that runs without decouple (onnx needs the onnx package).")
@click.option("--features-file", default=None, metavar="F.h5",
              help="The feature file, if it moved since the sweep (must be the same file: sha256 checked).")
@click.option("--backbone-weights", default=None, metavar="FILE",
              help="The fine-tuned backbone weights, if the run's checkpoint is not beside the feature file.")
def save_model(
    db: str, features: Optional[str], select_split: str, metric: str, out: str, format_: str,
    features_file: Optional[str], backbone_weights: Optional[str],
) -> None:
    """Save the val-best method of a sweep as a model that classifies images.

    The method with the best mean val score over its seeds is chosen (test
    is never looked at), its best seed refitted from the recorded settings,
    and written with the stage-one backbone it was trained on, the class
    names, the preprocessing and a temperature fitted on val. Classify with
    `decouple predict FILE IMAGES...`.
    """
    from decouple.study.select import save_best

    saved = save_best(
        db, out, features=features, metric=metric, split=select_split, features_path=features_file,
        backbone_weights=backbone_weights, format=format_,
    )
    if not saved.meta["selection"].get("refit_matches", True):
        click.echo(
            f"warning: the refitted head scores {saved.meta['selection']['refit_value']} on val, the sweep recorded "
            f"{saved.meta['selection']['value']} (a different device or precision?)", err=True,
        )
    click.echo(saved.describe(), err=True)
