"""Calibration (Guo et al., "On Calibration of Modern Neural Networks", ICML
2017): ECE and NLL on hand-computed cases and against the authors' ECE loop,
temperature scaling recovering a known temperature, and every stage-two
cell reporting both before and after scaling with a temperature fitted on val."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import log_softmax as scipy_log_softmax

from decouple.calibration import (
    LOG_PROB_FLOOR,
    temperature_bounds,
    expected_calibration_error,
    fit_temperature,
    log_softmax,
    negative_log_likelihood,
)
from decouple.features import FeatureSet
from decouple.metrics import evaluate
from decouple.stage_two.cells import Cell
from decouple.stage_two.fit import fit_cell, fit_cells
from decouple.stage_two.heads import NCMHead
from decouple.synthetic import gaussian_long_tailed

CALIBRATION_KEYS = ("ece", "nll", "ece_raw", "nll_raw")


def two_class_scores(probabilities):
    """Logits (N, 2) whose softmax is (p, 1 - p) for each p."""
    p = np.asarray(probabilities, dtype=np.float64)
    return np.log(np.stack([p, 1 - p], axis=1))


def test_ece_hand_case():
    # Two classes; the confidence of a row is max(p, 1 - p).
    #   row  probabilities  label  argmax  correct  confidence  bin (k/15, (k+1)/15]
    #   0    (0.90, 0.10)   0      0       1        0.90        13: (0.867, 0.933]
    #   1    (0.75, 0.25)   1      0       0        0.75        11: (0.733, 0.800]
    #   2    (0.55, 0.45)   0      0       1        0.55         8: (0.533, 0.600]
    #   3    (0.30, 0.70)   1      1       1        0.70        10: (0.667, 0.733]
    #   4    (0.72, 0.28)   1      0       0        0.72        10: (0.667, 0.733]
    # Bins 13, 11, 8 hold one row each: gaps |1 - 0.9| = 0.1, |0 - 0.75| = 0.75,
    # |1 - 0.55| = 0.45. Bin 10 holds two rows: accuracy 1/2, mean confidence
    # 0.71, gap 0.21 with weight 2/5.
    # ECE = (0.1 + 0.75 + 0.45) / 5 + 2/5 * 0.21 = 1.72 / 5 = 0.344.
    scores = two_class_scores([0.90, 0.75, 0.55, 0.30, 0.72])
    labels = np.array([0, 1, 0, 1, 1])
    assert expected_calibration_error(labels, scores) == pytest.approx(0.344, abs=1e-12)
    # One bin: |accuracy 3/5 - mean confidence 3.62/5| = 0.124.
    assert expected_calibration_error(labels, scores, bins=1) == pytest.approx(0.124, abs=1e-12)


def test_ece_bins_are_closed_on_the_right():
    # Equal scores give a confidence of exactly 1/2, which lies in the bin
    # (0, 0.5], as in the reference's `conf > lower & conf <= upper`:
    #   row 0: scores (0, 0), argmax 0 = label, confidence 0.5 -> bin 0, gap |1 - 0.5| = 0.5
    #   row 1: (0.9, 0.1), label 1, wrong, confidence 0.9     -> bin 1, gap |0 - 0.9| = 0.9
    # ECE = (0.5 + 0.9) / 2 = 0.7 (it would be |1 - 1.4| / 2 = 0.2 with both in one bin).
    scores = np.vstack([np.zeros((1, 2)), two_class_scores([0.9])])
    assert expected_calibration_error(np.array([0, 1]), scores, bins=2) == pytest.approx(0.7, abs=1e-12)


def reference_ece(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """The forward of ``_ECELoss`` of github.com/gpleiss/temperature_scaling,
    inlined, with bin edges and the sum in float64."""
    bin_boundaries = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    softmaxes = torch.softmax(logits, dim=1)
    confidences, predictions = torch.max(softmaxes, 1)
    accuracies = predictions.eq(labels)
    ece = torch.zeros(1, dtype=torch.float64)
    for bin_lower, bin_upper in zip(bin_boundaries[:-1], bin_boundaries[1:]):
        in_bin = confidences.gt(bin_lower.item()) * confidences.le(bin_upper.item())
        prop_in_bin = in_bin.double().mean()
        if prop_in_bin.item() > 0:
            accuracy_in_bin = accuracies[in_bin].double().mean()
            avg_confidence_in_bin = confidences[in_bin].mean()
            ece += torch.abs(avg_confidence_in_bin - accuracy_in_bin) * prop_in_bin
    return ece.item()


@pytest.mark.parametrize("seed", range(4))
def test_ece_equals_the_authors_loop(seed):
    rng = np.random.default_rng(seed)
    rows, classes = 500 + 300 * seed, 3 + 7 * seed
    logits = rng.standard_normal((rows, classes)) * (1.0 + seed)
    labels = np.where(rng.random(rows) < 0.6, logits.argmax(axis=1), rng.integers(0, classes, rows))
    for temperature in (0.5, 1.0, 2.0):
        expected = reference_ece(torch.from_numpy(logits / temperature), torch.from_numpy(labels))
        assert expected_calibration_error(labels, logits, temperature) == pytest.approx(expected, abs=1e-12)


def test_nll_hand_case():
    # Row 0: softmax(0, log 3) = (1/4, 3/4), label 0 -> -log(1/4) = log 4.
    # Row 1: three equal scores, label 1 -> -log(1/3) = log 3.
    scores = np.array([[0.0, math.log(3), -np.inf], [2.0, 2.0, 2.0]])
    labels = np.array([0, 1])
    assert negative_log_likelihood(labels, scores) == pytest.approx(math.log(12) / 2, abs=1e-12)
    # Dividing by T = 2 the scores (0, 2 log 3) gives row 0 again.
    doubled = np.array([[0.0, 2 * math.log(3)], [1.0, 1.0]])
    assert negative_log_likelihood(labels, doubled, 2.0) == pytest.approx(math.log(4 * 2) / 2, abs=1e-12)
    # The NLL is the mean of -log_softmax at the labels.
    assert negative_log_likelihood(labels, scores) == pytest.approx(-log_softmax(scores)[[0, 1], labels].mean())


def test_log_softmax_is_float64_and_floored():
    rng = np.random.default_rng(0)
    scores = (rng.standard_normal((50, 7)) * 20).astype(np.float32)
    out = log_softmax(scores, 3.0)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, scipy_log_softmax(scores.astype(np.float64) / 3.0, axis=1), rtol=1e-12, atol=1e-12)
    # A probability of exactly 0 (a score of -inf, or one far below the rest)
    # is floored, so the NLL stays finite.
    extreme = np.array([[0.0, -np.inf, -1e6]])
    assert np.all(log_softmax(extreme)[0, 1:] == LOG_PROB_FLOOR)
    assert negative_log_likelihood(np.array([1]), extreme) == pytest.approx(-LOG_PROB_FLOOR)


def test_bad_input_is_refused():
    scores = np.zeros((2, 3))
    with pytest.raises(ValueError, match="labels must lie in"):
        negative_log_likelihood(np.array([0, 3]), scores)
    with pytest.raises(ValueError, match="temperature"):
        expected_calibration_error(np.array([0, 1]), scores, 0.0)
    with pytest.raises(ValueError, match="row 1"):
        fit_temperature(np.array([0, 1]), np.array([[0.0, 1.0, 2.0], [0.0, np.nan, 1.0]]))
    with pytest.raises(ValueError, match="2-D"):
        log_softmax(np.zeros(3))


def test_no_rows():
    labels, scores = np.zeros(0, dtype=np.int64), np.zeros((0, 4), dtype=np.float32)
    assert fit_temperature(labels, scores) == 1.0
    assert math.isnan(negative_log_likelihood(labels, scores))
    assert math.isnan(expected_calibration_error(labels, scores))
    result = evaluate(labels, scores, np.array([200, 50, 10, 2]), temperature=2.0)
    assert all(result[key] is None for key in CALIBRATION_KEYS)


def test_fit_temperature_recovers_a_known_temperature():
    # Labels drawn from softmax(z / 2.5): the maximum-likelihood temperature
    # is consistent and asymptotically normal. With beta = 1 / T, the Fisher
    # information of beta is I = sum_i Var_{p_i}(z_i) (the variance of row i's
    # logits under its own softmax), and by the delta method the standard error
    # of T is T0^2 / sqrt(I). Six standard errors is a bound a correct fit
    # misses with probability about 2e-9, whatever the machine.
    true_temperature, rows, classes = 2.5, 20_000, 10
    rng = np.random.default_rng(12345)
    logits = rng.standard_normal((rows, classes)) * 3.0
    probabilities = np.exp(scipy_log_softmax(logits / true_temperature, axis=1))
    labels = (probabilities.cumsum(axis=1) < rng.random(rows)[:, None]).sum(axis=1).clip(max=classes - 1)
    mean = (probabilities * logits).sum(axis=1)
    information = ((probabilities * logits ** 2).sum(axis=1) - mean ** 2).sum()
    standard_error = true_temperature ** 2 / math.sqrt(information)
    assert standard_error < 0.05  # the test can tell 2.5 from a wrong answer
    fitted = fit_temperature(labels, logits)
    assert abs(fitted - true_temperature) < 6 * standard_error, (fitted, standard_error)
    # It is the minimum: a nudge either way does not lower the NLL.
    best = negative_log_likelihood(labels, logits, fitted)
    assert best <= negative_log_likelihood(labels, logits, fitted * 1.01)
    assert best <= negative_log_likelihood(labels, logits, fitted / 1.01)


def _score_sets():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 5, 300)
    informative = rng.standard_normal((300, 5)) + 3.0 * np.eye(5)[labels]
    return {
        "overconfident": (labels, informative * 10),
        "underconfident": (labels, informative / 10),
        "equal scores": (labels, np.zeros((300, 5))),
        "separated": (labels, 1e4 * np.eye(5)[labels]),  # wants T -> 0: the lower bound
        "wrong": (labels, -informative),  # worse than chance: wants T -> infinity
        "one row": (labels[:1], informative[:1]),
        "float16 with -inf": (labels, np.where(informative > -1.0, informative, -np.inf).astype(np.float16)),
    }


@pytest.mark.parametrize("name", list(_score_sets()))
def test_scaling_never_raises_the_nll_it_was_fitted_on(name):
    labels, scores = _score_sets()[name]
    temperature = fit_temperature(labels, scores)
    low, high = temperature_bounds(scores)
    assert low <= temperature <= high or temperature == 1.0  # 1.0: no T in range does better
    assert negative_log_likelihood(labels, scores, temperature) <= negative_log_likelihood(labels, scores)
    assert fit_temperature(labels, scores) == temperature  # deterministic


def test_evaluate_reports_before_and_after_scaling():
    labels, scores = _score_sets()["overconfident"]
    counts = np.array([500, 120, 60, 10, 5])
    raw = evaluate(labels, scores, counts)
    assert raw["nll"] == raw["nll_raw"] == negative_log_likelihood(labels, scores)
    assert raw["ece"] == raw["ece_raw"] == expected_calibration_error(labels, scores)
    scaled = evaluate(labels, scores, counts, temperature=4.0)
    assert scaled["nll_raw"] == raw["nll_raw"] and scaled["ece_raw"] == raw["ece_raw"]
    assert scaled["nll"] == negative_log_likelihood(labels, scores, 4.0)
    assert scaled["ece"] == expected_calibration_error(labels, scores, 4.0)
    assert scaled["top1"] == raw["top1"] and scaled["per_class"] == raw["per_class"]  # T never changes a prediction


@pytest.fixture(scope="module")
def small_data():
    feature_set, _ = gaussian_long_tailed(num_classes=6, dim=8, n_max=150, n_val=40, n_test=40, seed=3)
    return feature_set


def test_every_fitted_cell_reports_calibration(small_data, monkeypatch):
    calls = []
    original = NCMHead.decision_function
    monkeypatch.setattr(NCMHead, "decision_function", lambda self, X: calls.append(len(X)) or original(self, X))
    results = fit_cells(small_data, [Cell("linear", "ce", "instance"), Cell("ncm")])
    for result in results:
        calibration = result.params["calibration"]
        assert calibration["selected_on"] == "val" and calibration["bins"] == 15
        assert calibration["temperature"] > 0
        assert set(result.metrics) == {"val", "test"}
        for values in result.metrics.values():
            assert all(isinstance(values[key], float) and math.isfinite(values[key]) for key in CALIBRATION_KEYS)
            assert 0.0 <= values["ece"] <= 1.0 and 0.0 <= values["ece_raw"] <= 1.0
        val = result.metrics["val"]
        assert val["nll"] <= val["nll_raw"]  # the temperature was fitted on val's NLL
    # Each split is scored once: val's scores serve both the fit and its metrics.
    assert sorted(calls) == sorted([len(small_data.splits["val"].labels), len(small_data.splits["test"].labels)])


def test_without_val_the_temperature_is_one(small_data):
    splits = {name: split for name, split in small_data.splits.items() if name != "val"}
    no_val = FeatureSet(class_names=small_data.class_names, splits=splits, backbone=small_data.backbone)
    result = fit_cell(no_val, Cell("ncm"))
    assert result.params["calibration"] == {"temperature": 1.0, "selected_on": "default", "bins": 15}
    test = result.metrics["test"]
    assert test["nll"] == test["nll_raw"] and test["ece"] == test["ece_raw"]


def test_the_search_follows_the_scale_of_the_scores():
    """NCM's cosines on non-negative features differ by about 1e-3 within a
    row: their optimal T is about 1e-3 times that of the same scores scaled
    up, not clipped at a fixed bound."""
    labels, scores = _score_sets()["underconfident"]
    tiny = 1e-3 + scores * 1e-5
    expected = fit_temperature(labels, scores) * 1e-5
    np.testing.assert_allclose(fit_temperature(labels, tiny), expected, rtol=1e-4)
