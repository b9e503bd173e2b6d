"""Class priors: the test prior each method assumes, and moving a head's
scores to the prior it is deployed under.

Hong et al., "Disentangling Label Distribution for Long-tailed Visual
Recognition" (LADE, CVPR 2021), Sec. 3: a classifier's scores estimate
log p(x | y) + log pi_assumed(y) up to a constant, so under a deployment
prior pi_target the Bayes decision is argmax_y s_y + log pi_target(y) -
log pi_assumed(y). A re-balancing method assumes a uniform prior (it is
wrong on a long-tailed test set); plain cross-entropy assumes the prior its
sampler showed it.

The assumed prior of a cell (:func:`assumed_prior`):

* uniform when its head or its loss re-balances the classes
  (``balances_prior``: tau_norm, posthoc_la, lws, disalign, ncm; weighted_ce,
  class_balanced, balanced_softmax, ldam, equalization, logit_adjusted);
* else the class distribution its sampler draws in the last epoch
  (``trained_prior``: the training prior for instance sampling, uniform for
  class-balanced and progressive sampling, proportional to sqrt(n_c) for
  square-root, to real plus synthetic rows for calibrated_features);
* the training prior for a training-free head that does not re-balance
  (knn's votes count training images).

Scores are moved in the units of the head's calibrated logits: with T the
temperature fitted on val (:mod:`decouple.calibration`), s + T * (log
pi_target - log pi_assumed), so that the calibrated probabilities are
softmax(s / T + log pi_target - log pi_assumed). A head whose scores are
class probabilities (knn's votes, ``scores_are_probabilities``) is moved by
Bayes' rule on them instead, p * pi_target / pi_assumed renormalised. A class without training
images counts as one image in the training prior
(:func:`decouple.stage_two.losses.log_prior`).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from decouple.errors import ConfigError, DataError
from decouple.stage_two.config import NAMED_PRIORS  # the named priors; any other target is a file of weights
from decouple.stage_two.losses import LOSSES
from decouple.stage_two.losses import log_prior as train_log_prior
from decouple.stage_two.samplers import create_sampler



@dataclass(frozen=True)
class AssumedPrior:
    """The prior a fitted cell assumes: ``name`` ("uniform", "train" or
    "sampler:<name>") and its log probabilities (C,)."""

    name: str
    log_probabilities: np.ndarray

    def to_json(self) -> Mapping[str, Any]:
        return {"name": self.name, "log": [float(value) for value in self.log_probabilities]}


def log_uniform(num_classes: int) -> np.ndarray:
    """log(1 / C) for each of ``num_classes`` classes."""
    return np.full(int(num_classes), -np.log(int(num_classes)), dtype=np.float64)


def named_log_prior(name: str, class_counts: Sequence[int]) -> np.ndarray:
    """log pi of a named prior: "uniform" or "train" (the training counts)."""
    counts = np.asarray(class_counts)
    if name == "uniform":
        return log_uniform(len(counts))
    if name == "train":
        return train_log_prior(counts)
    raise ConfigError(f"unknown prior {name!r}; named priors: {', '.join(NAMED_PRIORS)} (or a file of class weights)")


def assumed_prior(head: Any, loss: Optional[str], sampler: Optional[str], class_counts: Sequence[int], *,
                  sampler_params: Optional[Mapping[str, Any]] = None, total_epochs: int = 1) -> AssumedPrior:
    """The prior a cell of ``head`` (a head object), ``loss`` and ``sampler``
    (names, None for a training-free head) assumes, by the rule of the
    module docstring; ``sampler_params`` and ``total_epochs`` as trained."""
    counts = np.asarray(class_counts)
    if head.balances_prior or (loss is not None and LOSSES.get(loss).balances_prior):
        return AssumedPrior("uniform", log_uniform(len(counts)))
    if sampler is None:
        return AssumedPrior("train", train_log_prior(counts))
    labels = np.repeat(np.arange(len(counts)), counts)
    drawn = create_sampler(sampler, labels, total_epochs=total_epochs, num_classes=len(counts),
                           **dict(sampler_params or {}))
    probabilities = np.asarray(drawn.trained_prior(), dtype=np.float64)
    if np.allclose(probabilities, counts / counts.sum(), rtol=1e-9, atol=0):
        return AssumedPrior("train", train_log_prior(counts))
    present = probabilities > 0
    if np.allclose(probabilities[present], 1.0 / present.sum(), rtol=1e-9, atol=0):
        return AssumedPrior("uniform", log_uniform(len(counts)))
    # A class the sampler never draws (no training image) gets the rarest drawn class's probability.
    floored = np.where(present, probabilities, probabilities[present].min())
    return AssumedPrior(f"sampler:{sampler}", np.log(floored / floored.sum()))


def read_prior_file(path: str, class_names: Sequence[str]) -> np.ndarray:
    """log pi from a file of class weights: JSON ``{"class name": weight}`` or
    CSV rows ``class name,weight`` (a header row is allowed), every class
    named once with a weight > 0; weights are normalised to sum to 1."""
    source = Path(path)
    if not source.is_file():
        raise DataError(f"{path}: no such prior file (give uniform, train or a JSON / CSV file of class weights)")
    text = source.read_text(encoding="utf-8")
    if source.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, Mapping):
            raise DataError(f"{path}: must be a JSON object mapping class names to weights")
        pairs: List[Tuple[str, Any]] = [(str(name), weight) for name, weight in data.items()]
    else:
        rows = [row for row in csv.reader(text.splitlines()) if row and any(cell.strip() for cell in row)]
        if rows and rows[0][0].strip() not in class_names and len(rows[0]) >= 2 and not _is_number(rows[0][1]):
            rows = rows[1:]  # header
        if any(len(row) != 2 for row in rows):
            raise DataError(f"{path}: every CSV row must be 'class name,weight'")
        pairs = [(row[0].strip(), row[1].strip()) for row in rows]
    index = {name: position for position, name in enumerate(class_names)}
    weights = np.full(len(class_names), np.nan)
    for name, weight in pairs:
        if name not in index:
            raise DataError(f"{path}: unknown class {name!r}; the classes are {', '.join(class_names[:10])}"
                            f"{', ...' if len(class_names) > 10 else ''}")
        if not np.isnan(weights[index[name]]):
            raise DataError(f"{path}: class {name!r} is given twice")
        if not _is_number(weight) or not 0 < float(weight) < np.inf:
            raise DataError(f"{path}: the weight of class {name!r} must be a number > 0; got {weight!r}")
        weights[index[name]] = float(weight)
    missing = [name for name, position in index.items() if np.isnan(weights[position])]
    if missing:
        raise DataError(f"{path}: no weight for {len(missing)} classes, e.g. {missing[0]!r}")
    return np.log(weights) - np.log(weights.sum())


def target_log_prior(target: str, class_counts: Sequence[int], class_names: Sequence[str]) -> np.ndarray:
    """log pi_target of ``target``: a named prior or a file of class weights."""
    if target in NAMED_PRIORS:
        return named_log_prior(target, class_counts)
    return read_prior_file(target, class_names)


def shift_scores(scores: np.ndarray, log_target: np.ndarray, log_assumed: np.ndarray, temperature: float, *,
                 probabilities: bool = False) -> np.ndarray:
    """Scores (N, C) moved from the assumed prior to the target one, in the
    scores' dtype: logits s + T * (log pi_target - log pi_assumed); with
    ``probabilities`` (a head whose scores are class probabilities, knn's
    votes) Bayes' rule on them, p * pi_target / pi_assumed renormalised."""
    ratio = np.asarray(log_target, dtype=np.float64) - np.asarray(log_assumed, dtype=np.float64)
    values = np.asarray(scores, dtype=np.float64)
    if probabilities:
        moved = values * np.exp(ratio - ratio.max())
        moved /= np.maximum(moved.sum(axis=1, keepdims=True), np.finfo(np.float64).tiny)
    else:
        moved = values + float(temperature) * ratio
    return moved.astype(np.asarray(scores).dtype, copy=False)


def parse_view(view: str) -> Tuple[str, str]:
    """``"test_lt@train"`` -> ("test_lt", "train"): a split scored under a
    named prior (checked by :meth:`TrainConfig.validated`)."""
    split, _, prior = str(view).partition("@")
    return split, prior


def _is_number(text: Any) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True
