"""Metrics are pure functions; check them on hand-computed cases."""

import numpy as np
import pytest

from decouple.metrics import (
    evaluate,
    macro_f1_score,
    per_class_f1,
    mean_class_accuracy,
    per_class_accuracy,
    shot_groups,
    top_k_accuracy,
)


def test_top_k_accuracy_hand_case():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.35, 0.4, 0.25]])
    labels = np.array([1, 2, 2, 0])
    assert top_k_accuracy(labels, scores, 1) == pytest.approx(0.5)
    # row 1: label 2 ranks third, so it is the only miss at k=2
    assert top_k_accuracy(labels, scores, 2) == pytest.approx(0.75)
    assert top_k_accuracy(labels, scores, 5) == 1.0  # k capped at C


def test_per_class_and_mean_class_accuracy():
    labels = np.array([0, 0, 0, 0, 1, 1, 2])
    predictions = np.array([0, 0, 0, 1, 1, 0, 2])
    accuracy = per_class_accuracy(labels, predictions, 4)
    np.testing.assert_allclose(accuracy[:3], [0.75, 0.5, 1.0])
    assert np.isnan(accuracy[3])
    assert mean_class_accuracy(labels, predictions, 4) == pytest.approx((0.75 + 0.5 + 1.0) / 3)


def test_macro_f1_hand_case():
    labels = np.array([0, 0, 1, 1])
    predictions = np.array([0, 1, 1, 1])
    # class 0: p=1, r=.5 -> f1=2/3; class 1: p=2/3, r=1 -> f1=.8
    assert macro_f1_score(labels, predictions, 2) == pytest.approx((2 / 3 + 0.8) / 2)


def test_shot_groups_thresholds():
    counts = np.array([500, 101, 100, 20, 19, 1])
    groups = shot_groups(counts)
    assert groups["many"].tolist() == [0, 1]
    assert groups["medium"].tolist() == [2, 3]
    assert groups["few"].tolist() == [4, 5]
    custom = shot_groups(counts, many_threshold=200, few_threshold=50)
    assert custom["many"].tolist() == [0]
    assert custom["few"].tolist() == [3, 4, 5]


def test_evaluate_empty_group_is_none_not_zero():
    train_counts = np.array([500, 300, 50])  # no few-shot class
    labels = np.array([0, 1, 2, 2])
    scores = np.eye(3)[[0, 0, 2, 1]]
    result = evaluate(labels, scores, train_counts)
    assert result["few"] is None
    assert result["many"] == pytest.approx(0.5)
    assert result["medium"] == pytest.approx(0.5)
    assert result["n"] == 4
    assert result["top1"] == pytest.approx(0.5)
    assert result["per_class"] == [1.0, 0.0, 0.5]


def test_group_macro_f1_hand_case():
    train_counts = np.array([500, 300, 50])
    labels = np.array([0, 1, 2, 2])
    scores = np.eye(3)[[0, 0, 2, 1]]
    result = evaluate(labels, scores, train_counts)
    # per-class F1: class 0 p=1/2 r=1 -> 2/3; class 1 -> 0; class 2 p=1 r=1/2 -> 2/3
    assert result["many_f1"] == pytest.approx((2 / 3 + 0.0) / 2)
    assert result["medium_f1"] == pytest.approx(2 / 3)
    assert result["few_f1"] is None
    assert result["macro_f1"] == pytest.approx((2 / 3 + 0 + 2 / 3) / 3)


@pytest.mark.parametrize("seed", range(5))
def test_hand_written_metrics_equal_scikit_learns(seed):
    """top-k and mean per-class accuracy are hand-written for speed and memory
    (see their docstrings); on untied scores they equal scikit-learn's."""
    from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score

    rng = np.random.default_rng(seed)
    num_classes = 12
    labels = np.concatenate([np.arange(num_classes), rng.integers(0, num_classes, 300)])
    scores = rng.standard_normal((len(labels), num_classes)) + 1.5 * np.eye(num_classes)[labels]
    for k in (1, 3, 5):
        assert top_k_accuracy(labels, scores, k) == pytest.approx(
            top_k_accuracy_score(labels, scores, k=k, labels=np.arange(num_classes)), abs=1e-12
        )
    predictions = scores.argmax(axis=1)
    assert mean_class_accuracy(labels, predictions, num_classes) == pytest.approx(
        balanced_accuracy_score(labels, predictions), abs=1e-12
    )


@pytest.mark.parametrize("seed", range(20))
def test_f1_by_bincounts_is_scikit_learns_to_the_last_bit(seed):
    """macro-F1 and per-class F1 are bincounts (no scikit-learn import); they
    give the very floats of scikit-learn's f1_score, so results stored before
    the change compare equal. Random class counts, absent and never-predicted
    classes included."""
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(seed)
    num_classes, n = int(rng.integers(2, 40)), int(rng.integers(1, 400))
    labels = rng.integers(0, num_classes, n)
    predictions = np.where(rng.random(n) < 0.6, labels, rng.integers(0, num_classes, n))
    present = np.unique(labels)
    assert macro_f1_score(labels, predictions, num_classes) == float(
        f1_score(labels, predictions, labels=present, average="macro", zero_division=0))
    ours = per_class_f1(labels, predictions, num_classes)
    theirs = f1_score(labels, predictions, labels=np.arange(num_classes), average=None, zero_division=0)
    absent = np.bincount(labels, minlength=num_classes) == 0
    assert np.array_equal(ours[~absent], theirs[~absent]) and np.isnan(ours[absent]).all()


def test_shot_groups_thirds_on_cifar10_lt_counts():
    # CIFAR-10-LT at imbalance 100 (exponential_counts(5000, 10, 100)): the
    # thresholds leave "few" empty; thirds cut at round(10/3) = 3, round(20/3) = 7.
    counts = np.array([5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50])
    assert shot_groups(counts)["few"].tolist() == []
    groups = shot_groups(counts, rule="thirds")
    assert groups["many"].tolist() == [0, 1, 2]
    assert groups["medium"].tolist() == [3, 4, 5, 6]
    assert groups["few"].tolist() == [7, 8, 9]
    # Ranked by count, not by index: the same counts shuffled follow their classes.
    shuffled = counts[[9, 0, 5, 2, 7, 1, 8, 3, 6, 4]]
    groups = shot_groups(shuffled, rule="thirds")
    assert groups["many"].tolist() == [1, 3, 5]
    assert groups["medium"].tolist() == [2, 7, 8, 9]
    assert sorted(groups["few"].tolist()) == groups["few"].tolist() == [0, 4, 6]


def test_shot_groups_thirds_breaks_ties_by_class_index():
    # Sorted by (count desc, index): (9,1) (9,4) | (5,0) (5,2) (5,3) | (5,6) (1,5);
    # C = 7 cuts at round(7/3) = 2 and round(14/3) = 5, inside the tie of 5s:
    # the lower indices stay in medium, class 6 falls to few.
    counts = np.array([5, 9, 5, 5, 9, 1, 5])
    groups = shot_groups(counts, rule="thirds")
    assert groups["many"].tolist() == [1, 4]
    assert groups["medium"].tolist() == [0, 2, 3]
    assert groups["few"].tolist() == [5, 6]
    # All equal: index order alone.
    equal = shot_groups(np.full(10, 7), rule="thirds")
    assert [equal[name].tolist() for name in ("many", "medium", "few")] == [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]]


@pytest.mark.parametrize("num_classes, sizes", [
    (1, (0, 1, 0)), (2, (1, 0, 1)), (3, (1, 1, 1)), (4, (1, 2, 1)), (5, (2, 1, 2)),
    (10, (3, 4, 3)), (11, (4, 3, 4)), (12, (4, 4, 4)), (100, (33, 34, 33)), (1000, (333, 334, 333)),
])
def test_shot_groups_thirds_sizes_partition_the_classes(num_classes, sizes):
    counts = np.random.default_rng(num_classes).integers(1, 50, size=num_classes)
    groups = shot_groups(counts, rule="thirds")
    assert tuple(len(groups[name]) for name in ("many", "medium", "few")) == sizes
    assert sorted(np.concatenate(list(groups.values())).tolist()) == list(range(num_classes))
    # Every many class has at least the count of every medium class, and so on down.
    for upper, lower in (("many", "medium"), ("medium", "few")):
        if len(groups[upper]) and len(groups[lower]):
            assert counts[groups[upper]].min() >= counts[groups[lower]].max()


def test_shot_groups_unknown_rule_names_it():
    with pytest.raises(ValueError, match="'halves'"):
        shot_groups(np.array([3, 2, 1]), rule="halves")


def test_evaluate_with_thirds_scores_a_few_group_the_thresholds_leave_empty():
    train_counts = np.array([500, 300, 50])
    labels = np.array([0, 1, 2, 2])
    scores = np.eye(3)[[0, 0, 2, 1]]
    assert evaluate(labels, scores, train_counts)["few"] is None
    result = evaluate(labels, scores, train_counts, shot_rule="thirds")
    assert (result["many"], result["medium"], result["few"]) == (1.0, 0.0, 0.5)
    assert result["few_f1"] is not None
