"""Evaluation metrics: pure functions, arrays in, numbers out.

Shot groups follow one of two rules (:data:`SHOT_RULES`):

* "thresholds" (the default), Liu et al., "Large-Scale Long-Tailed
  Recognition in an Open World" (CVPR 2019): many-shot classes have more
  than 100 training images, medium-shot 20 to 100, few-shot fewer than 20
  (the thresholds are settings). The literature's rule on CIFAR-100-LT,
  ImageNet-LT and Places-LT; it leaves "few" empty on CIFAR-10-LT.
* "thirds": the classes ranked by training count and cut into three groups
  of (nearly) equal size, so no group is empty once C >= 3.

A group with no classes scores ``None`` (null in JSON), never 0.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from decouple.calibration import calibratable, expected_calibration_error, negative_log_likelihood

MANY_THRESHOLD = 100
FEW_THRESHOLD = 20
GROUPS = ("many", "medium", "few")
#: The rules that define the shot groups (:func:`shot_groups`); the first is the default.
SHOT_RULES = ("thresholds", "thirds")
DEFAULT_SHOT_RULE = "thresholds"


def top_k_accuracy(labels: np.ndarray, scores: np.ndarray, k: int = 1) -> float:
    """Fraction of rows whose true label is among the ``k`` highest scores.

    ``labels`` (N,), ``scores`` (N, C); ``k`` is capped at C. Equals
    scikit-learn's ``top_k_accuracy_score`` on untied scores (tested), which
    is not used: it sorts every row in full (O(N C log C) against
    argpartition's O(N C)) and warns where k >= C.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    if len(labels) == 0:
        return float("nan")
    k = min(k, scores.shape[1])
    if k == 1:
        return float(np.mean(scores.argmax(axis=1) == labels))
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return float(np.mean((top == labels[:, None]).any(axis=1)))


def per_class_accuracy(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Accuracy of each class (C,); NaN for a class with no samples."""
    labels = np.asarray(labels)
    predictions = np.asarray(predictions)
    support = np.bincount(labels, minlength=num_classes).astype(np.float64)
    correct = np.bincount(labels[predictions == labels], minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, correct / np.maximum(support, 1), np.nan)


def mean_class_accuracy(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> float:
    """Mean of per-class accuracies over classes present in ``labels``.

    scikit-learn's ``balanced_accuracy_score`` gives the same number (tested)
    but builds a C x C confusion matrix (530 MB of int64 at iNaturalist's
    8,142 classes) and warns when a prediction names a class absent from
    ``labels``; bincounts are O(N + C).
    """
    return _nanmean(per_class_accuracy(labels, predictions, num_classes))


def _nanmean(values: np.ndarray) -> float:
    """Mean of the non-NaN entries (NaN if none): mean class accuracy's reduction."""
    return float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan")


def _present_mean(values: np.ndarray) -> float:
    """Mean of the non-NaN entries (NaN if none), summed over those alone, as
    scikit-learn's macro average does: macro-F1's reduction."""
    present = ~np.isnan(values)
    return float(values[present].mean()) if present.any() else float("nan")


def macro_f1_score(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> float:
    """Unweighted mean F1 over the classes present in ``labels``.

    scikit-learn's ``f1_score(labels=present, average="macro",
    zero_division=0)`` computes the same floats (tested); bincounts spare
    the import of scikit-learn (seconds) in the commands that only read
    results.
    """
    return _present_mean(per_class_f1(labels, predictions, num_classes))


def f1_from_counts(correct: np.ndarray, predicted: np.ndarray, support: np.ndarray) -> np.ndarray:
    """F1 = 2 TP / (n + P) from per-class counts of any shape (broadcast): TP
    correct images, P images predicted as the class, n its images. What
    :func:`per_class_f1` and the bootstrap (:mod:`decouple.study.bootstrap`)
    both compute, so that a resample of all-ones weights gives the same floats."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return 2.0 * correct / (support + predicted)


def per_class_f1(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """F1 of each class (C,), 2 TP_c / (n_c + P_c) with n_c its images and P_c
    the images predicted as c (0 where both are 0 is impossible: NaN for a
    class with no samples in ``labels``)."""
    labels = np.asarray(labels)
    predictions = np.asarray(predictions)
    support = np.bincount(labels, minlength=num_classes)[:num_classes].astype(np.float64)
    predicted = np.bincount(predictions, minlength=num_classes)[:num_classes].astype(np.float64)
    correct = np.bincount(labels[predictions == labels], minlength=num_classes)[:num_classes].astype(np.float64)
    return np.where(support > 0, f1_from_counts(correct, predicted, support), np.nan)


def shot_groups(
    train_counts: np.ndarray,
    *,
    rule: str = DEFAULT_SHOT_RULE,
    many_threshold: int = MANY_THRESHOLD,
    few_threshold: int = FEW_THRESHOLD,
) -> Dict[str, np.ndarray]:
    """Class indices (ascending) of the many, medium and few groups.

    ``rule`` "thresholds": many > ``many_threshold``, medium in
    [``few_threshold``, ``many_threshold``], few < ``few_threshold``
    training images.

    ``rule`` "thirds": the C classes sorted by (training count descending,
    class index ascending) and cut at ranks round(C/3) and round(2C/3)
    (C/3 is never a half, so the rounding is unambiguous): many is the first
    round(C/3) classes, medium the next, few the rest. C = 10 gives 3 / 4 / 3
    classes, C = 100 gives 33 / 34 / 33, C = 11 gives 4 / 3 / 4. Classes with
    equal counts are ordered by index, so tied classes across a cut are
    split deterministically: the lower index lands in the larger-count group.
    """
    counts = np.asarray(train_counts)
    if rule == "thirds":
        num_classes = len(counts)
        order = np.lexsort((np.arange(num_classes), -counts.astype(np.int64)))
        first, second = (num_classes + 1) // 3, (2 * num_classes + 1) // 3  # round(C/3), round(2C/3)
        return {
            "many": np.sort(order[:first]),
            "medium": np.sort(order[first:second]),
            "few": np.sort(order[second:]),
        }
    if rule != "thresholds":
        raise ValueError(f"shot-group rule must be one of {', '.join(SHOT_RULES)}; got {rule!r}")
    if few_threshold > many_threshold:
        raise ValueError(
            f"few threshold {few_threshold} must not exceed many threshold {many_threshold}"
        )
    return {
        "many": np.flatnonzero(counts > many_threshold),
        "medium": np.flatnonzero((counts >= few_threshold) & (counts <= many_threshold)),
        "few": np.flatnonzero(counts < few_threshold),
    }


def describe_shot_groups(
    rule: str = DEFAULT_SHOT_RULE, *, many_threshold: int = MANY_THRESHOLD, few_threshold: int = FEW_THRESHOLD
) -> str:
    """The rule of :func:`shot_groups` as one phrase for a table note or caption,
    e.g. "many > 100, medium 20-100, few < 20 training images"."""
    if rule == "thirds":
        return "many/medium/few: thirds of the classes by training count"
    return f"many > {many_threshold}, medium {few_threshold}-{many_threshold}, few < {few_threshold} training images"


def group_mean(per_class: np.ndarray, classes: np.ndarray) -> Optional[float]:
    """Mean of a per-class score over ``classes`` that have samples (non-NaN); None if none."""
    values = np.asarray(per_class)[classes]
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else None


def _none_if_nan(value: float) -> Optional[float]:
    return None if value is None or np.isnan(value) else float(value)


def evaluate(
    labels: np.ndarray,
    scores: np.ndarray,
    train_counts: np.ndarray,
    *,
    shot_rule: str = DEFAULT_SHOT_RULE,
    many_threshold: int = MANY_THRESHOLD,
    few_threshold: int = FEW_THRESHOLD,
    temperature: float = 1.0,
) -> Dict[str, object]:
    """All metrics of one split: n, top1, top5, macro_f1, mean_class_acc,
    many / medium / few accuracy and many_f1 / medium_f1 / few_f1 (the mean
    per-class F1 of each group, groups by ``shot_rule`` and the thresholds,
    :func:`shot_groups`; None when the group is empty), the
    calibration of softmax(scores) (:mod:`decouple.calibration`): nll_raw
    and ece_raw at T = 1, nll and ece at ``temperature`` (the same when it
    is 1; all None for an empty split), many_nll / medium_nll / few_nll (the
    NLL at T = 1 over the split's samples of that group's classes,
    :func:`group_nll`), and per_class accuracy (a list with None for
    classes absent from the split).

    ``labels`` (N,), ``scores`` (N, C), ``train_counts`` (C,).
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    num_classes = len(train_counts)
    predictions = scores.argmax(axis=1)
    class_accuracy = per_class_accuracy(labels, predictions, num_classes)
    groups = shot_groups(
        train_counts, rule=shot_rule, many_threshold=many_threshold, few_threshold=few_threshold
    )
    result: Dict[str, object] = {
        "n": int(len(labels)),
        "top1": _none_if_nan(top_k_accuracy(labels, scores, 1)),
        "top5": _none_if_nan(top_k_accuracy(labels, scores, 5)),
    }
    class_f1 = per_class_f1(labels, predictions, num_classes) if len(labels) else class_accuracy
    result["macro_f1"] = _none_if_nan(_present_mean(class_f1)) if len(labels) else None
    result["mean_class_acc"] = _none_if_nan(_nanmean(class_accuracy))
    for name in GROUPS:
        result[name] = group_mean(class_accuracy, groups[name])
    for name in GROUPS:
        result[f"{name}_f1"] = group_mean(class_f1, groups[name])
    result.update(_calibration(labels, scores, temperature, groups))
    per_class: List[Optional[float]] = [_none_if_nan(value) for value in class_accuracy]
    result["per_class"] = per_class
    return result


def group_nll(labels: np.ndarray, scores: np.ndarray, classes: np.ndarray) -> Optional[float]:
    """Mean negative log-likelihood of softmax(scores) at T = 1 over the rows
    whose label is in ``classes`` (a mean over images, as nll_raw is over
    the split); None when no row is. ``labels`` (N,), ``scores`` (N, C)."""
    rows = np.isin(np.asarray(labels), classes)
    if not rows.any():
        return None
    return negative_log_likelihood(np.asarray(labels)[rows], np.asarray(scores)[rows])


def _calibration(
    labels: np.ndarray, scores: np.ndarray, temperature: float, groups: Dict[str, np.ndarray]
) -> Dict[str, Optional[float]]:
    """nll_raw, ece_raw (T = 1), nll, ece (at ``temperature``) and the NLL of
    each shot group at T = 1 (<group>_nll); None for no rows, or for scores
    that are no logits (NaN, +inf: a diverged head)."""
    if len(labels) == 0 or not calibratable(scores):
        return {"nll_raw": None, "ece_raw": None, "nll": None, "ece": None,
                **{f"{name}_nll": None for name in GROUPS}}
    raw = {
        "nll_raw": negative_log_likelihood(labels, scores),
        "ece_raw": expected_calibration_error(labels, scores),
        **{f"{name}_nll": group_nll(labels, scores, groups[name]) for name in GROUPS},
    }
    if float(temperature) == 1.0:
        return {**raw, "nll": raw["nll_raw"], "ece": raw["ece_raw"]}
    return {
        **raw,
        "nll": negative_log_likelihood(labels, scores, temperature),
        "ece": expected_calibration_error(labels, scores, temperature),
    }
