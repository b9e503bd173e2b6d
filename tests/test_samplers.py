"""Tests of decouple.stage_two.samplers: class frequencies against each paper's formula,
determinism, coverage, and the DDP wrapper. Parametrised over the registry."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from decouple.errors import ConfigError, DataError, UnknownNameError
from decouple.stage_two.samplers import (
    SAMPLERS,
    ClassSampler,
    DistributedClassSampler,
    create_sampler,
    list_samplers,
)

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
