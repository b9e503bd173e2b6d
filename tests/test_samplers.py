"""Tests of decouple.stage_two.samplers: class frequencies against each paper's formula,
determinism, coverage, the DDP wrapper, and calibrated_features' synthetic rows against
Free Lunch's formula. Parametrised over the registry."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from decouple.errors import ConfigError, DataError, UnknownNameError
from decouple.stage_two.cells import Cell
from decouple.stage_two.config import TrainConfig
from decouple.stage_two.fit import fit_cells
from decouple.stage_two.heads import CosineFamily
from decouple.stage_two.losses import create_loss
from decouple.stage_two.samplers import (
    SAMPLERS,
    ClassSampler,
    DistributedClassSampler,
    create_sampler,
    list_samplers,
)
from decouple.stage_two.trainer import PreparedData, train_heads, with_synthetic_rows

DESIGN_NAMES = ["instance", "class_balanced", "square_root", "progressive"]

# Six classes: 500, 100, 20, 5 images, none (class 4), 1 image.
COUNTS = np.array([500, 100, 20, 5, 0, 1])
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(len(COUNTS)), COUNTS))
PRESENT = COUNTS > 0
TOTAL_EPOCHS = 5


def _instance(epoch: int) -> np.ndarray:
    return COUNTS / COUNTS.sum()


def _class_balanced(epoch: int) -> np.ndarray:
    return PRESENT / PRESENT.sum()


def _square_root(epoch: int) -> np.ndarray:
    root = np.sqrt(COUNTS)
    return root / root.sum()


def _progressive(epoch: int) -> np.ndarray:
    # Kang et al.'s schedule with t / (T - 1), so epoch 0 is instance and T - 1 class-balanced.
    share = epoch / (TOTAL_EPOCHS - 1)
    return (1 - share) * _instance(epoch) + share * _class_balanced(epoch)


# Every registered sampler needs its paper's class distribution here.
EXPECTED = {
    "instance": _instance,
    "class_balanced": _class_balanced,
    "square_root": _square_root,
    "progressive": _progressive,
    # Before augment() it draws instance-uniformly over the real rows.
    "calibrated_features": _instance,
}


@pytest.fixture(params=sorted(SAMPLERS))
def name(request):
    return request.param


def test_design_names_are_registered():
    assert set(DESIGN_NAMES) <= set(SAMPLERS)


def test_every_registered_sampler_has_an_expected_distribution():
    assert set(SAMPLERS) <= set(EXPECTED), f"add {sorted(set(SAMPLERS) - set(EXPECTED))} to EXPECTED"


@pytest.mark.parametrize("epoch", [0, 2, TOTAL_EPOCHS - 1])
def test_class_probabilities_match_the_formula(name, epoch):
    sampler = create_sampler(name, LABELS, total_epochs=TOTAL_EPOCHS)
    sampler.set_epoch(epoch)
    probabilities = sampler.class_probabilities()
    assert probabilities.shape == (len(COUNTS),)
    np.testing.assert_allclose(probabilities, EXPECTED[name](epoch), rtol=1e-12, atol=1e-15)
    assert probabilities[4] == 0.0  # the empty class


@pytest.mark.parametrize("epoch", [0, 2, TOTAL_EPOCHS - 1])
def test_empirical_class_frequencies_match_class_probabilities(name, epoch):
    draws = 200_000
    sampler = create_sampler(name, LABELS, total_epochs=TOTAL_EPOCHS, seed=3, num_samples=draws)
    sampler.set_epoch(epoch)
    indices = sampler.epoch_indices().numpy()
    frequencies = np.bincount(LABELS[indices], minlength=len(COUNTS)) / draws
    expected = sampler.class_probabilities()
    # Each class count is Binomial(draws, p): 5 standard errors (plus a floor
    # for p near 0) keeps a correct sampler from failing by chance.
    tolerance = 5 * np.sqrt(expected * (1 - expected) / draws) + 1e-9
    assert np.all(np.abs(frequencies - expected) <= tolerance), (frequencies, expected)
    assert frequencies[4] == 0.0


def test_instances_are_uniform_within_a_class():
    sampler = create_sampler("class_balanced", LABELS, num_samples=60_000, seed=1)
    indices = sampler.epoch_indices().numpy()
    rows_of_class_2 = np.flatnonzero(LABELS == 2)  # 20 rows, each drawn ~ 60000 / 5 / 20 = 600 times
    hits = np.array([(indices == row).sum() for row in rows_of_class_2])
    expected = 60_000 / PRESENT.sum() / 20
    assert np.all(np.abs(hits - expected) <= 5 * np.sqrt(expected))


@pytest.mark.parametrize("epoch", [0, 1, 7])
def test_instance_covers_every_index_exactly_once(epoch):
    sampler = create_sampler("instance", LABELS, seed=5)
    sampler.set_epoch(epoch)
    indices = sampler.epoch_indices().numpy()
    np.testing.assert_array_equal(np.sort(indices), np.arange(len(LABELS)))


def test_instance_with_more_samples_than_rows_spreads_evenly():
    sampler = create_sampler("instance", LABELS, num_samples=int(2.5 * len(LABELS)))
    hits = np.bincount(sampler.epoch_indices().numpy(), minlength=len(LABELS))
    assert set(np.unique(hits)) <= {2, 3} and hits.sum() == int(2.5 * len(LABELS))


def test_same_seed_and_epoch_give_identical_indices(name):
    first = create_sampler(name, LABELS, total_epochs=TOTAL_EPOCHS, seed=11)
    second = create_sampler(name, LABELS, total_epochs=TOTAL_EPOCHS, seed=11)
    first.set_epoch(2)
    second.set_epoch(2)
    assert torch.equal(first.epoch_indices(), second.epoch_indices())
    assert torch.equal(first.epoch_indices(), first.epoch_indices())


def test_different_epoch_or_seed_gives_different_indices(name):
    sampler = create_sampler(name, LABELS, total_epochs=TOTAL_EPOCHS, seed=11)
    epoch_zero = sampler.epoch_indices()
    sampler.set_epoch(1)
    assert not torch.equal(epoch_zero, sampler.epoch_indices())
    other_seed = create_sampler(name, LABELS, total_epochs=TOTAL_EPOCHS, seed=12)
    assert not torch.equal(epoch_zero, other_seed.epoch_indices())


def test_iteration_length_dtype_and_dataloader(name):
    sampler = create_sampler(name, torch.as_tensor(LABELS), total_epochs=TOTAL_EPOCHS, num_samples=50)
    assert isinstance(sampler, ClassSampler)
    indices = sampler.epoch_indices()
    assert indices.dtype == torch.int64 and indices.shape == (50,)
    assert len(sampler) == 50
    items = list(sampler)
    assert items == indices.tolist() and all(type(item) is int for item in items)
    assert 0 <= min(items) and max(items) < len(LABELS)
    batches = list(DataLoader(torch.arange(len(LABELS)), sampler=sampler, batch_size=16))
    assert torch.equal(torch.cat(batches), indices)


def test_progressive_moves_from_instance_to_class_balanced():
    sampler = create_sampler("progressive", LABELS, total_epochs=TOTAL_EPOCHS)
    instance = create_sampler("instance", LABELS).class_probabilities()
    balanced = create_sampler("class_balanced", LABELS).class_probabilities()
    tail_share = []
    for epoch in range(TOTAL_EPOCHS):
        sampler.set_epoch(epoch)
        tail_share.append(sampler.class_probabilities()[5])
    sampler.set_epoch(0)
    np.testing.assert_allclose(sampler.class_probabilities(), instance)
    sampler.set_epoch(TOTAL_EPOCHS - 1)
    np.testing.assert_allclose(sampler.class_probabilities(), balanced)
    assert np.all(np.diff(tail_share) > 0)
    sampler.set_epoch(TOTAL_EPOCHS + 3)  # past the schedule it stays class-balanced
    np.testing.assert_allclose(sampler.class_probabilities(), balanced)


def test_num_classes_pads_absent_trailing_classes(name):
    sampler = create_sampler(name, [0, 0, 1, 0], num_classes=4)
    probabilities = sampler.class_probabilities()
    assert probabilities.shape == (4,) and probabilities[2:].tolist() == [0.0, 0.0]
    assert probabilities.sum() == pytest.approx(1.0)
    assert set(sampler.epoch_indices().tolist()) <= {0, 1, 2, 3}


def test_single_class_and_single_row(name):
    sampler = create_sampler(name, np.array([3]), num_samples=4)
    assert sampler.epoch_indices().tolist() == [0, 0, 0, 0]
    np.testing.assert_allclose(sampler.class_probabilities(), [0, 0, 0, 1])


def test_epoch_indices_are_fast_on_a_million_rows(name):
    labels = np.random.default_rng(0).integers(0, 1000, size=1_000_000) ** 2 // 1000  # skewed
    sampler = create_sampler(name, labels, total_epochs=10)
    sampler.set_epoch(4)
    start = time.perf_counter()
    indices = sampler.epoch_indices()
    elapsed = time.perf_counter() - start
    assert len(indices) == 1_000_000
    # Vectorised: ~0.1 s here; a Python loop over rows would take tens of seconds.
    assert elapsed < 5.0


def test_description_is_one_line(name):
    description = dict(list_samplers())[name]
    assert description and "\n" not in description


# ---------------------------------------------------------------------------
# Distributed wrapper.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("num_replicas", [1, 3, 4, 7])
def test_distributed_ranks_partition_the_epoch(name, num_replicas):
    num_samples = 12
    base = create_sampler(name, LABELS, total_epochs=TOTAL_EPOCHS, seed=2, num_samples=num_samples)
    ranks = [
        DistributedClassSampler(
            create_sampler(name, LABELS, total_epochs=TOTAL_EPOCHS, seed=2, num_samples=num_samples),
            num_replicas=num_replicas,
            rank=rank,
        )
        for rank in range(num_replicas)
    ]
    for epoch in (0, 3):
        base.set_epoch(epoch)
        for rank_sampler in ranks:
            rank_sampler.set_epoch(epoch)
        full = base.epoch_indices().tolist()
        parts = [list(rank_sampler) for rank_sampler in ranks]
        per_rank = -(-num_samples // num_replicas)
        assert all(len(part) == per_rank == len(rank_sampler) for part, rank_sampler in zip(parts, ranks))
        padded = (full * (1 + per_rank * num_replicas // num_samples))[: per_rank * num_replicas]
        # Interleaving the ranks gives back the (padded) epoch, each position exactly once.
        interleaved = [parts[i % num_replicas][i // num_replicas] for i in range(per_rank * num_replicas)]
        assert interleaved == padded
        if num_samples % num_replicas == 0:
            assert sorted(sum(parts, [])) == sorted(full)


def test_distributed_pads_by_wrapping_when_samples_are_fewer_than_ranks():
    base = create_sampler("instance", [0, 1], num_samples=2)
    parts = [list(DistributedClassSampler(base, num_replicas=5, rank=rank)) for rank in range(5)]
    assert all(len(part) == 1 for part in parts)
    full = base.epoch_indices().tolist()
    assert [part[0] for part in parts] == (full * 3)[:5]


def test_distributed_rejects_bad_rank():
    base = create_sampler("instance", LABELS)
    with pytest.raises(ConfigError, match="rank"):
        DistributedClassSampler(base, num_replicas=2, rank=2)


# ---------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------


def test_unknown_name_lists_known_samplers():
    with pytest.raises(UnknownNameError) as info:
        create_sampler("class_balance", LABELS)
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message
    for known in SAMPLERS:
        assert known in message


def test_unknown_param_is_named():
    with pytest.raises(ConfigError, match="temperature"):
        create_sampler("square_root", LABELS, temperature=2.0)


@pytest.mark.parametrize(
    "labels,fragment",
    [
        ([], "non-empty"),
        ([[0, 1]], "1-D"),
        ([0.0, 1.0], "integers"),
        ([0, -1], ">= 0"),
    ],
)
def test_bad_labels_are_data_errors(labels, fragment):
    with pytest.raises(DataError, match=fragment):
        create_sampler("instance", np.array(labels))


def test_labels_beyond_num_classes_are_data_errors():
    with pytest.raises(DataError, match=r"\[0, 2\)"):
        create_sampler("instance", [0, 1, 2], num_classes=2)


@pytest.mark.parametrize(
    "options,fragment",
    [({"total_epochs": 0}, "total_epochs"), ({"seed": -1}, "seed"), ({"num_samples": 0}, "num_samples")],
)
def test_bad_options_are_config_errors(options, fragment):
    with pytest.raises(ConfigError, match=fragment):
        create_sampler("instance", LABELS, **options)


def test_negative_epoch_is_rejected():
    with pytest.raises(ConfigError, match="epoch"):
        create_sampler("instance", LABELS).set_epoch(-1)


# ---------------------------------------------------------------------------
# calibrated_features: tail classes topped up from calibrated Gaussians.
# ---------------------------------------------------------------------------

# Four head classes (>= 20 images) at the corners of a square, three tail
# classes near chosen pairs of them; D = 3, unequal spreads per feature.
CALIBRATION_COUNTS = np.array([40, 32, 26, 21, 9, 4, 1])
CALIBRATION_CENTRES = np.array([[0, 0, 0], [8, 0, 0], [0, 8, 0], [8, 8, 0], [5, 1, 1], [1, 5, 0], [7, 6, 1]], float)


def _calibration_case(seed: int = 0):
    """(features (N, 3) float32 tensor, labels (N,)) of the hand-made case, rows shuffled."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(len(CALIBRATION_COUNTS)), CALIBRATION_COUNTS))
    features = CALIBRATION_CENTRES[labels] + rng.standard_normal((len(labels), 3)) * np.array([1.0, 0.5, 2.0])
    return torch.as_tensor(features, dtype=torch.float32), labels


def _paper_calibration(x: np.ndarray, labels: np.ndarray, tail: int, *, k: int, alpha: float):
    """Free Lunch's eqs. (5)-(6) in numpy: (donors, mean', Sigma') of class ``tail``
    from its k nearest head classes (>= 20 images), alpha in units of the
    mean per-feature variance."""
    counts = np.bincount(labels)
    heads = np.flatnonzero(counts >= 20)
    means = np.stack([x[labels == c].mean(axis=0) for c in range(len(counts))])
    donors = heads[np.argsort(np.linalg.norm(means[heads] - means[tail], axis=1))[:k]]
    mean = (means[donors].sum(axis=0) + means[tail]) / (k + 1)
    covariance = np.mean([np.cov(x[labels == d].T) for d in donors], axis=0)
    covariance += alpha * x.var(axis=0).mean() * np.eye(x.shape[1])
    return donors, mean, covariance


@pytest.mark.parametrize("k,alpha", [(2, 0.1), (1, 0.0), (3, 0.5)])
def test_calibrated_mean_and_covariance_follow_the_paper(k, alpha):
    x, labels = _calibration_case()
    sampler = create_sampler("calibrated_features", labels, k=k, alpha=alpha)
    np.testing.assert_array_equal(sampler.tail_classes, [4, 5, 6])
    np.testing.assert_array_equal(sampler.head_classes, [0, 1, 2, 3])
    calibrations = sampler.calibrations(x)
    assert [c.label for c in calibrations] == [4, 5, 6]
    # Topped up to the smallest head class (21 images).
    assert [c.draws for c in calibrations] == [21 - 9, 21 - 4, 21 - 1]
    x64 = x.double().numpy()
    for calibration in calibrations:
        donors, mean, covariance = _paper_calibration(x64, labels, calibration.label, k=k, alpha=alpha)
        assert calibration.donors == tuple(donors)
        np.testing.assert_allclose(calibration.mean.numpy(), mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(sampler.covariance(x, calibration).numpy(), covariance, rtol=1e-5, atol=1e-6)
    # By construction: class 4 (centre (5, 1, 1)) lies nearest heads 1, then 0, then 3.
    assert calibrations[0].donors == (1, 0, 3)[:k]


def test_draws_follow_the_calibrated_gaussian():
    x, labels = _calibration_case()
    draws = 40_000
    sampler = create_sampler("calibrated_features", labels, seed=4, top_up_to=draws + 9, alpha=0.3)
    calibration = sampler.calibrations(x)[0]
    rows = sampler.augment(x)
    assert rows.shape == (3 * draws + 9 - 4 - 1 + 9, 3)
    sample = rows[:draws].double().numpy()  # class 4's rows come first
    assert (sampler.labels[len(labels) : len(labels) + draws] == 4).all()
    mean, covariance = calibration.mean.double().numpy(), sampler.covariance(x, calibration).numpy()
    # Five standard errors of a Gaussian sample mean and covariance:
    # Var(mean_j) = S_jj / m, Var(cov_jl) ~ (S_jl^2 + S_jj S_ll) / m.
    mean_error = 5 * np.sqrt(np.diag(covariance) / draws)
    covariance_error = 5 * np.sqrt((covariance**2 + np.outer(np.diag(covariance), np.diag(covariance))) / draws)
    assert np.all(np.abs(sample.mean(axis=0) - mean) <= mean_error), (sample.mean(axis=0), mean)
    assert np.all(np.abs(np.cov(sample.T) - covariance) <= covariance_error), (np.cov(sample.T), covariance)


def test_epochs_after_augment_draw_real_and_synthetic_rows_by_their_counts():
    x, labels = _calibration_case()
    sampler = create_sampler("calibrated_features", labels, seed=2, total_epochs=50, top_up_to=30)
    real = len(labels)
    synthetic = sampler.augment(x)
    total = real + len(synthetic)
    expected_counts = np.maximum(CALIBRATION_COUNTS, [40, 32, 26, 21, 30, 30, 30])
    assert len(sampler) == total == expected_counts.sum()
    np.testing.assert_array_equal(sampler.labels[:real], labels)
    np.testing.assert_allclose(sampler.class_probabilities(), expected_counts / total)
    hits = np.zeros(total, dtype=np.int64)
    for epoch in range(50):
        sampler.set_epoch(epoch)
        indices = sampler.epoch_indices().numpy()
        hits += np.bincount(indices, minlength=total)
        np.testing.assert_array_equal(np.bincount(sampler.labels[indices]), expected_counts)
    assert np.all(hits == 50)  # every real and synthetic row once an epoch
    # With num_samples given, classes are drawn with probability (n_c + m_c) / (N + M).
    drawn = create_sampler("calibrated_features", labels, seed=2, num_samples=100_000, top_up_to=30)
    drawn.augment(x)
    frequencies = np.bincount(drawn.labels[drawn.epoch_indices().numpy()], minlength=7) / 100_000
    expected = expected_counts / total
    assert np.all(np.abs(frequencies - expected) <= 5 * np.sqrt(expected * (1 - expected) / 100_000))


def test_same_seed_same_synthetic_rows_other_seed_differs():
    x, labels = _calibration_case()
    first, second, other = (create_sampler("calibrated_features", labels, seed=seed) for seed in (7, 7, 8))
    rows = first.augment(x)
    assert torch.equal(rows, second.augment(x))
    assert torch.equal(rows, first.augment(x))  # augmenting again starts again from the real rows
    assert len(first.labels) == len(labels) + len(rows)
    assert not torch.equal(rows, other.augment(x))


def test_without_tail_classes_nothing_is_synthesised():
    labels = np.repeat([0, 1, 2], [50, 40, 30])
    sampler = create_sampler("calibrated_features", labels)
    rows = sampler.augment(torch.randn(len(labels), 4))
    assert rows.shape == (0, 4) and len(sampler) == len(labels)
    # The largest class is always a donor, even below tail_below.
    few = create_sampler("calibrated_features", [0, 0, 0, 1], k=3)
    np.testing.assert_array_equal(few.tail_classes, [1])
    assert few.augment(torch.randn(4, 2)).shape == (2, 2) and few.calibrations(torch.randn(4, 2))[0].donors == (0,)
    # A fraction: classes below a tenth of the largest.
    fraction = create_sampler("calibrated_features", np.repeat([0, 1, 2], [500, 60, 40]), tail_below=0.1)
    np.testing.assert_array_equal(fraction.tail_classes, [2])


@pytest.mark.parametrize(
    "options,parameter",
    [
        ({"tail_below": 0}, "tail_below"),
        ({"tail_below": -5}, "tail_below"),
        ({"tail_below": float("nan")}, "tail_below"),
        ({"tail_below": True}, "tail_below"),
        ({"tail_below": "20"}, "tail_below"),
        ({"k": 0}, "k"),
        ({"k": 1.5}, "k"),
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": float("inf")}, "alpha"),
        ({"top_up_to": 0}, "top_up_to"),
        ({"top_up_to": 2.5}, "top_up_to"),
    ],
)
def test_bad_calibration_settings_name_the_parameter(options, parameter):
    with pytest.raises(ConfigError, match=f"sampler parameter {parameter} must"):
        create_sampler("calibrated_features", LABELS, **options)


def test_augment_wants_the_training_features_in_label_order():
    sampler = create_sampler("calibrated_features", LABELS)
    with pytest.raises(DataError, match=rf"\({len(LABELS)}, D\)"):
        sampler.augment(torch.randn(len(LABELS) - 1, 4))
    with pytest.raises(DataError, match="floating-point"):
        sampler.augment(torch.zeros(len(LABELS), 4, dtype=torch.int64))


def test_the_trainer_trains_every_family_on_the_synthetic_rows(gaussian_feature_set):
    train, val = gaussian_feature_set.splits["train"], gaussian_feature_set.splits["val"]
    data = PreparedData.from_arrays(train.features, train.labels, val_features=val.features, val_labels=val.labels)
    seen = []

    class Recording(CosineFamily):
        def inputs(self, data, split):
            rows = super().inputs(data, split)
            seen.append((split, rows.shape[0]))
            return rows

    config = TrainConfig(epochs=2).validated()
    sampler = create_sampler("calibrated_features", train.labels, total_epochs=2, seed=1)
    train_heads(data, [create_loss("ce", class_counts=data.class_counts)], sampler=sampler,
                family=Recording([16.0]), seed=1, train=config)
    extra = int(sampler.synthetic_counts.sum())
    assert extra > 0 and seen == [("train", len(train.labels) + extra), ("val", len(val.labels))]
    augmented = with_synthetic_rows(data, create_sampler("calibrated_features", train.labels, seed=1))
    assert augmented.x.shape == (len(train.labels) + extra, data.x.shape[1])
    assert torch.equal(augmented.y[: len(train.labels)], data.y) and augmented.x_val is data.x_val
    np.testing.assert_array_equal(augmented.class_counts, data.class_counts)  # the real counts
    assert augmented.mean is data.mean and augmented.scale is data.scale


def test_calibrated_features_lifts_few_shot_accuracy(gaussian_feature_set):
    """Topping the few-shot classes up with calibrated features lifts their
    held-out accuracy by at least 5 points over instance sampling on the same
    linear head and loss, and costs the other classes little."""
    base, calibrated = fit_cells(gaussian_feature_set, [Cell("linear", "ce", "instance", 0),
                                                        Cell("linear", "ce", "calibrated_features", 0)])
    base, calibrated = base.metrics["test"], calibrated.metrics["test"]
    assert calibrated["few"] >= base["few"] + 0.05
    assert calibrated["mean_class_acc"] > base["mean_class_acc"]
    assert calibrated["many"] >= base["many"] - 0.05 and calibrated["medium"] >= base["medium"] - 0.05


def test_every_head_family_trains_with_calibrated_features(gaussian_feature_set):
    results = fit_cells(gaussian_feature_set, [Cell(head, "ce", "calibrated_features", 0, params={
        "calibrated_features": {"k": 1}}) for head in ("cosine", "lws", "tau_norm")])
    for result in results:
        assert result.params["sampler"] == {"tail_below": 20, "k": 1, "alpha": 0.1, "top_up_to": None}
        assert result.metrics["test"]["mean_class_acc"] > 0.5, result.head
