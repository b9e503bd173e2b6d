"""Fitting cells: every (head, loss, sampler, seed) of a list on one feature
set, gradient heads trained together in fused passes
(:mod:`decouple.stage_two.trainer`), training-free heads fitted directly,
and every split but train scored (:func:`decouple.metrics.evaluate`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from tqdm import tqdm

from decouple.calibration import DEFAULT_BINS, calibratable, fit_temperature
from decouple.metrics import evaluate
from decouple.predictions import SplitPredictions
from decouple.stage_two.cells import Cell, CellResult, freeze_settings, method_params, validate_cell
from decouple.stage_two.config import TrainConfig
from decouple.stage_two.heads import create_head
from decouple.stage_two.losses import create_loss
from decouple.stage_two.priors import AssumedPrior, named_log_prior, parse_view, shift_scores, target_log_prior
from decouple.stage_two.samplers import create_sampler
from decouple.stage_two.trainer import PreparedData, train_heads


def _label_of(feature_set) -> str:
    return str(feature_set.path) if feature_set.path is not None else "<in memory>"


def _score_head(head, feature_set, train: TrainConfig, *, assumed: AssumedPrior, target: Optional[str] = None
                ) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, Any], Dict[str, SplitPredictions]]:
    """(metrics, calibration, per-image predictions) of every split but
    train: a temperature is fitted on the val split's scores (Guo et al.
    2017; T = 1 without val) and every split is scored before and after it.
    Each split's scores are computed once.

    ``target``: a prior ("uniform", "train" or a file of class weights)
    every split is scored under, the head's scores moved from the
    ``assumed`` prior (:mod:`decouple.stage_two.priors`); ``train.views``
    add splits scored under a named prior (``test_lt@train``) where the
    file has the split."""
    splits = feature_set.eval_splits
    scores = {}
    if "val" in splits:
        val = feature_set.splits["val"]
        scores["val"] = head.decision_function(val.features)
        if calibratable(scores["val"]):
            temperature, selected_on = fit_temperature(val.labels, scores["val"]), "val"
        else:  # a diverged head: its accuracy is still reported, its calibration is not defined
            temperature, selected_on = 1.0, "default (non-finite val scores)"
    else:
        temperature, selected_on = 1.0, "default"
    counts = feature_set.train_counts
    log_target = None if target is None else target_log_prior(target, counts, feature_set.class_names)
    views = [(f"{split}@{prior}", split, named_log_prior(prior, counts))
             for split, prior in map(parse_view, train.views) if split in splits]
    metrics, predictions = {}, {}
    scored = [(name, name, log_target) for name in splits] + views
    for position, (name, split_name, log_prior) in enumerate(scored):
        split = feature_set.splits[split_name]
        if split_name not in scores:
            scores[split_name] = head.decision_function(split.features)
        split_scores = scores[split_name]
        if not any(later == split_name for _, later, _ in scored[position + 1:]):
            del scores[split_name]  # its last use
        if log_prior is not None:
            split_scores = shift_scores(split_scores, log_prior, assumed.log_probabilities, temperature,
                                        probabilities=head.scores_are_probabilities)
        metrics[name] = evaluate(
            split.labels,
            split_scores,
            feature_set.group_counts,  # the reference profile's where the file has them
            shot_rule=train.groups,
            many_threshold=train.many_threshold,
            few_threshold=train.few_threshold,
            temperature=temperature,
        )
        predictions[name] = SplitPredictions.from_scores(split.labels, split_scores)
    calibration = {"temperature": temperature, "selected_on": selected_on, "bins": DEFAULT_BINS}
    return metrics, calibration, predictions


def _reference_of(feature_set) -> Dict[str, Any]:
    """Which counts the shot groups came from: ``{"counts": "train"}``, or the
    reference profile's counts and source (recorded with every result)."""
    if feature_set.reference_counts is None:
        return {"counts": "train"}
    return {"counts": "reference", "reference_counts": [int(count) for count in feature_set.reference_counts],
            "reference_source": feature_set.reference_source}


@dataclass
class _Plan:
    """A validated cell with its head object and resolved settings."""

    index: int
    cell: Cell
    head: Any
    settings: Dict[str, Dict[str, Any]]
    weight_index: int = -1  # which of its group's trained weights it uses


def _plan_cells(feature_set, cells: Sequence[Cell], train: TrainConfig) -> List[_Plan]:
    """Validate every cell and build its head, loss and sampler once, so a bad
    name or setting fails before any training starts."""
    plans = []
    for index, cell in enumerate(cells):
        cell = validate_cell(cell)
        settings = method_params(cell)
        plans.append(_Plan(index=index, cell=cell, head=create_head(cell.head, **settings["head"]), settings=settings))
    for plan in plans:
        plan.head.check_features(feature_set)
        if plan.head.trainable:
            plan.head.check_settings(
                plan.cell.loss, plan.cell.sampler, plan.settings, class_counts=feature_set.train_counts, train=train
            )
    return plans


class _Results:
    """Scores finished heads into CellResults, in the order of the cells,
    calling ``on_result`` and advancing the progress bar as each is ready."""

    def __init__(self, feature_set, train: TrainConfig, count: int, on_result, progress: bool,
                 keep_heads: bool, target_prior: Optional[str] = None) -> None:
        self.feature_set, self.train, self.on_result, self.keep_heads = feature_set, train, on_result, keep_heads
        self.target_prior = target_prior
        self.results: List[Optional[CellResult]] = [None] * count
        label = _label_of(feature_set)
        self.bar = tqdm(total=count, unit="cell", desc=label, leave=False) if progress else None

    def finish(self, plan: _Plan, seconds: float) -> None:
        trainable = plan.head.trainable
        assumed = plan.head.assumed_prior(
            plan.cell.loss, plan.cell.sampler, self.feature_set.train_counts,
            sampler_params=plan.settings["sampler"] if trainable else None, total_epochs=self.train.epochs,
        )
        metrics, calibration, predictions = _score_head(plan.head, self.feature_set, self.train, assumed=assumed,
                                                        target=self.target_prior)
        params = {"head": plan.head.get_params(), **plan.head.selection_()}
        if trainable:
            params["loss"] = plan.head.loss_params_
            params["sampler"] = plan.head.sampler_params_
            params["train"] = self.train.to_dict()
        params["calibration"] = calibration
        params["prior"] = {"assumed": assumed.name, "target": self.target_prior}
        # The rule of the many / medium / few metrics, beside them for every head
        # (training-free heads record no train settings).
        params["shot_groups"] = {"rule": self.train.groups, "many_threshold": self.train.many_threshold,
                                 "few_threshold": self.train.few_threshold, **_reference_of(self.feature_set)}
        result = CellResult(
            features=_label_of(self.feature_set),
            head=plan.cell.head,
            loss=plan.cell.loss,
            sampler=plan.cell.sampler,
            seed=plan.cell.seed,
            params=params,
            fit_seconds=seconds,
            metrics=metrics,
            predictions=predictions,
            fitted_head=plan.head if self.keep_heads else None,
            cell=plan.cell,
        )
        self.results[plan.index] = result
        if self.on_result is not None:
            self.on_result(result)
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> List[CellResult]:
        if self.bar is not None:
            self.bar.close()
        return [result for result in self.results if result is not None]


def fit_cells(
    feature_set,
    cells: Sequence[Cell],
    *,
    train: TrainConfig = TrainConfig(),
    on_result: Optional[Callable[[CellResult], None]] = None,
    progress: bool = False,
    keep_heads: bool = False,
    target_prior: Optional[str] = None,
) -> List[CellResult]:
    """Fit every cell on ``feature_set`` and score every split but train.

    Gradient-trained cells sharing (sampler, sampler settings, seed, the
    head's ``fusion_key``) train in one fused pass; cells whose weights
    would be identical (e.g. linear, tau_norm and lws with the same loss)
    share them. A fused pass's wall time is shared equally by the weights it
    trains. ``on_result`` is called with each result as it is ready; the
    returned list follows the order of ``cells``; with ``keep_heads`` each
    result holds its fitted head (``fitted_head``), e.g. to save it as a
    model. All cells are validated before any training starts.
    ``target_prior``: score every split under this prior ("uniform",
    "train" or a file of class weights; :mod:`decouple.stage_two.priors`)
    instead of the one each method assumes.
    """
    train = train.validated().for_rows(len(feature_set.splits["train"]))
    plans = _plan_cells(feature_set, cells, train)
    if target_prior is not None:  # a bad file fails before any training
        target_log_prior(target_prior, feature_set.train_counts, feature_set.class_names)
    results = _Results(feature_set, train, len(plans), on_result, progress, keep_heads, target_prior)
    train_split = feature_set.splits["train"]
    groups: Dict[Tuple, List[_Plan]] = {}
    try:
        for plan in plans:
            if plan.head.trainable:
                key = (plan.cell.sampler, freeze_settings(plan.settings["sampler"]), plan.cell.seed,
                       plan.head.fusion_key())
                groups.setdefault(key, []).append(plan)
                continue
            start = time.perf_counter()
            plan.head.fit(train_split.features, train_split.labels, num_classes=feature_set.num_classes,
                          classifier=feature_set.classifier)
            results.finish(plan, time.perf_counter() - start)
        data = _prepared(feature_set, train.resolved_device()) if groups else None
        for (sampler_name, _, seed, _), members in groups.items():
            _fit_group(data, members, sampler_name, seed, train, results.finish)
    finally:
        finished = results.close()
    return finished


def _prepared(feature_set, device: str) -> PreparedData:
    """The standardised train and val tensors of ``feature_set`` on ``device``."""
    train_split = feature_set.splits["train"]
    val_split = feature_set.splits.get("val")
    return PreparedData.from_arrays(
        train_split.features,
        train_split.labels,
        val_features=None if val_split is None else val_split.features,
        val_labels=None if val_split is None else val_split.labels,
        num_classes=feature_set.num_classes,
        device=device,
    )


def _fit_group(data: PreparedData, members: List[_Plan], sampler_name: str, seed: int, train: TrainConfig,
               finish: Callable[[_Plan, float], None]) -> None:
    """Train one fused pass for ``members`` (one weight per distinct loss and
    loss settings), then run each member's post-fit step."""
    start = time.perf_counter()
    weight_keys: Dict[Tuple, int] = {}
    losses = []
    for plan in members:
        loss_params = plan.head.training_loss_params(plan.cell.loss, plan.settings["loss"])
        key = (plan.cell.loss, freeze_settings(loss_params))
        if key not in weight_keys:
            weight_keys[key] = len(losses)
            losses.append(create_loss(plan.cell.loss, class_counts=data.class_counts, **loss_params))
        plan.weight_index = weight_keys[key]
    sampler = create_sampler(
        sampler_name, data.y.cpu().numpy(), total_epochs=train.epochs, seed=seed, **members[0].settings["sampler"]
    )
    family = members[0].head.weight_family(losses)
    trained = train_heads(data, losses, sampler=sampler, family=family, seed=seed, train=train)
    shared_seconds = (time.perf_counter() - start) / max(len(trained), 1)
    for plan in members:
        own_start = time.perf_counter()
        plan.head.fit_from_weights(
            trained[plan.weight_index],
            data,
            loss=plan.cell.loss,
            sampler=plan.cell.sampler,
            loss_params=plan.settings["loss"],
            sampler_params=plan.settings["sampler"],
            seed=seed,
            train=train,
        )
        finish(plan, shared_seconds + time.perf_counter() - own_start)


def fit_cell(feature_set, cell: Cell, *, train: TrainConfig = TrainConfig(), keep_head: bool = False,
             target_prior: Optional[str] = None) -> CellResult:
    """Fit and score one cell (:func:`fit_cells` with a single cell)."""
    return fit_cells(feature_set, [cell], train=train, keep_heads=keep_head, target_prior=target_prior)[0]
