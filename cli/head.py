"""`decouple head`: retrain one classifier head on a feature file and score it."""

from __future__ import annotations

import json
from typing import Optional, Tuple

import click

from cli.options import (
    append_json_line,
    check_output_path,
    describe_result,
    method_settings,
    features_option,
    shot_threshold_options,
)

# decouple.stage_two.config.PRECISIONS, spelled out so that --help imports no numpy.
PRECISIONS = ("float32", "bfloat16", "auto")


@click.command("head")
@features_option
@click.option("--loss", default=None, metavar="NAME",
              help="Long-tailed loss (`decouple list losses`); default ce for trainable heads.")
@click.option("--sampler", default=None, metavar="NAME",
              help="Re-sampler (`decouple list samplers`); default instance for trainable heads.")
@click.option("--head", "head_name", default="linear", show_default=True, metavar="NAME",
              help="Classifier head (`decouple list heads`).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--epochs", type=int, default=None,
              help="Train exactly this many epochs [the default budget: at least --min-steps "
                   "optimizer steps and 10 epochs, which trains a head to convergence on any file size].")
@click.option("--min-steps", type=int, default=None, help="Optimizer steps of the default budget [600].")
@click.option("--lr", type=float, default=None, help="Peak learning rate [0.07 for adam and adamw, 0.1 for sgd].")
@click.option("--batch-size", type=int, default=None, help="Mini-batch size [512].")
@click.option("--optimizer", type=click.Choice(["adam", "sgd", "adamw"]), default=None, help="Optimizer [adam].")
@click.option("--device", default=None, help="torch device [cuda if available, else cpu].")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="Precision of the training matrix products [auto: bfloat16 on a CUDA GPU "
                   "with native bf16, float32 on any CPU]. Recorded in params.train.")
@shot_threshold_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option("--output", default=None, metavar="results.jsonl",
              help="Append the result to this file as one JSON line.")
@click.option("--save-model", "save_model", default=None, metavar="FILE",
              help="Also write this head, the stage-one backbone and the preprocessing as one model file "
                   "(`decouple predict FILE IMAGES...`).")
@click.option("--backbone-weights", default=None, metavar="FILE",
              help="With --save-model: the fine-tuned backbone weights, if the run's checkpoint is not "
                   "beside the feature file.")
@click.option("--target-prior", default=None, metavar="uniform|train|FILE",
              help="Score every split under this class prior: uniform, train (the training counts) or a "
                   "JSON / CSV file of class weights (class name,weight); the head's scores move from the "
                   "prior its method assumes (params.prior) [that prior]. A saved model keeps the assumed "
                   "prior: give `decouple predict --target-prior`.")
@click.option("--param", "params", multiple=True, metavar="METHOD.KEY=VALUE",
              help="A setting of the head, loss or sampler, as in a sweep config's params: (repeatable), "
                   "e.g. linear.max_norm=1.0, focal.gamma=1.5, calibrated_features.tail_below=0.1 "
                   "(`decouple list` names them); VALUE is read as YAML.")
@click.option("--view", "views", multiple=True, metavar="SPLIT@PRIOR",
              help="Also score SPLIT under a named prior, as split SPLIT@PRIOR, e.g. test_lt@train "
                   "(repeatable).")
def head(
    features_path: str,
    loss: Optional[str],
    sampler: Optional[str],
    head_name: str,
    seed: int,
    epochs: Optional[int],
    min_steps: Optional[int],
    lr: Optional[float],
    batch_size: Optional[int],
    optimizer: Optional[str],
    device: Optional[str],
    precision: Optional[str],
    groups: str,
    many_threshold: int,
    few_threshold: int,
    as_json: bool,
    output: Optional[str],
    save_model: Optional[str],
    backbone_weights: Optional[str],
    target_prior: Optional[str],
    params: Tuple[str, ...],
    views: Tuple[str, ...],
) -> None:
    """Fit one head (with a loss and sampler) on --features; choose on val, score val and test."""
    from decouple.deploy.save import fit_head_file
    from decouple.metrics import describe_shot_groups
    from decouple.stage_two.cells import Cell, validate_cell
    from decouple.stage_two.config import TrainConfig

    overrides = dict(epochs=epochs, min_steps=min_steps, lr=lr, batch_size=batch_size, optimizer=optimizer,
                     device=device, precision=precision)
    train = TrainConfig(
        views=tuple(views),
        groups=groups,
        many_threshold=many_threshold,
        few_threshold=few_threshold,
        **{key: value for key, value in overrides.items() if value is not None},
    )
    check_output_path(output)
    cell = validate_cell(Cell(head=head_name, loss=loss, sampler=sampler, seed=seed))
    cell = Cell(head=cell.head, loss=cell.loss, sampler=cell.sampler, seed=cell.seed,
                params=method_settings(params, [cell.head, cell.loss, cell.sampler]))
    result, saved = fit_head_file(
        features_path, cell, train=train,
        save_to=save_model, backbone_weights=backbone_weights, target_prior=target_prior,
    )
    if saved is not None:
        click.echo(saved.describe(), err=True)
    record = result.to_json()
    if output is not None:
        append_json_line(output, record)
    if as_json:
        click.echo(json.dumps(record))
    else:
        rule = describe_shot_groups(groups, many_threshold=many_threshold, few_threshold=few_threshold)
        click.echo(describe_result(record, shot_groups=rule))
