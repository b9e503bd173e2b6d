"""Mixed precision (TrainConfig.precision) in the fused trainer: accuracy
beside float32, reproducibility, what is recorded, bad values; and the
losses' applies_own_scale flag the cosine head relies on."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from decouple.errors import ConfigError
from decouple.losses import LOSSES, create_loss
from decouple.stage_two import (
    PRECISIONS,
    Cell,
    PreparedData,
    TrainConfig,
    fit_cells,
    native_bfloat16,
    train_heads,
)
from decouple.samplers import create_sampler

# One fused pass per (sampler, family): linear (with tau_norm and lws on the
# ce weights), cosine with and without LDAM, and a class-balanced sampler.
CELLS = [
    Cell("linear", "ce"),
    Cell("linear", "balanced_softmax"),
    Cell("linear", "ldam"),
    Cell("linear", "focal"),
    Cell("tau_norm", "ce"),
    Cell("lws", "ce"),
    Cell("cosine", "ce"),
    Cell("cosine", "ldam"),
    Cell("linear", "ce", "class_balanced"),
]


@pytest.fixture(scope="module")
def by_precision(gaussian_feature_set):
    """precision -> results of CELLS with the default training (30 epochs)."""
    return {
        precision: fit_cells(gaussian_feature_set, CELLS, train=TrainConfig(device="cpu", precision=precision))
        for precision in ("float32", "bfloat16")
    }


def test_bfloat16_scores_like_float32(by_precision):
    for single, mixed in zip(by_precision["float32"], by_precision["bfloat16"]):
        name = f"{single.head}/{single.loss}/{single.sampler}"
        for split in ("val", "test"):
            # Measured: at most 0.15 points top1 and 0.33 points few apart.
            assert abs(mixed.metrics[split]["top1"] - single.metrics[split]["top1"]) <= 0.01, (name, split)
            assert abs(mixed.metrics[split]["few"] - single.metrics[split]["few"]) <= 0.03, (name, split)


def test_bfloat16_keeps_the_acceptance_margins(by_precision):
    results = {(r.head, r.loss, r.sampler): r.metrics["test"] for r in by_precision["bfloat16"]}
    ce = results[("linear", "ce", "instance")]
    balanced = results[("linear", "balanced_softmax", "instance")]
    assert balanced["top1"] >= ce["top1"] + 0.04
    assert balanced["few"] >= ce["few"] + 0.15
    assert results[("cosine", "ldam", "instance")]["few"] > results[("cosine", "ce", "instance")]["few"]


def test_the_precision_used_is_recorded(by_precision):
    for precision, results in by_precision.items():
        for result in results:
            assert result.params["train"]["precision"] == precision
    assert TrainConfig().precision == "auto"  # resolved by validated(), never recorded as "auto"


def test_auto_resolves_to_what_the_device_does_natively(gaussian_feature_set):
    expected = "bfloat16" if native_bfloat16("cpu") else "float32"
    train = TrainConfig(device="cpu", precision="auto", epochs=2)
    assert train.validated().precision == expected
    assert train.to_dict()["precision"] == expected
    result = fit_cells(gaussian_feature_set, [Cell("linear", "ce")], train=train)[0]
    assert result.params["train"]["precision"] == expected


def test_bfloat16_is_deterministic_on_the_cpu(gaussian_feature_set):
    cells = [Cell("linear", "focal", "progressive", seed=1), Cell("lws", "equalization", seed=1),
             Cell("cosine", "ldam", seed=1)]
    train = TrainConfig(epochs=4, device="cpu", precision="bfloat16")
    first = fit_cells(gaussian_feature_set, cells, train=train)
    second = fit_cells(gaussian_feature_set, cells, train=train)
    for a, b in zip(first, second):
        assert a.metrics == b.metrics
        assert a.params == b.params
    other = fit_cells(gaussian_feature_set, [dataclasses.replace(cells[0], seed=2)], train=train)[0]
    assert other.metrics["val"]["per_class"] != first[0].metrics["val"]["per_class"]


def test_bfloat16_keeps_float32_weights_and_fuses_like_separate_passes(gaussian_feature_set):
    train_split, val_split = gaussian_feature_set.splits["train"], gaussian_feature_set.splits["val"]
    data = PreparedData.from_arrays(train_split.features, train_split.labels,
                                    val_features=val_split.features, val_labels=val_split.labels)
    names = ["ce", "balanced_softmax", "ldam"]
    train = TrainConfig(epochs=3, device="cpu", precision="bfloat16")

    def sampler():
        return create_sampler("square_root", train_split.labels, total_epochs=3, seed=3)

    fused = train_heads(data, [create_loss(n, class_counts=data.class_counts) for n in names],
                        sampler=sampler(), seed=3, train=train)
    for name, together in zip(names, fused):
        assert together.weight.dtype == torch.float32 and together.bias.dtype == torch.float32
        alone = train_heads(data, [create_loss(name, class_counts=data.class_counts)],
                            sampler=sampler(), seed=3, train=train)[0]
        assert together.epoch == alone.epoch
        torch.testing.assert_close(together.weight, alone.weight, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("bad", ["fp16", "bf16", "", None, 16])
def test_a_bad_precision_is_a_config_error(gaussian_feature_set, bad):
    with pytest.raises(ConfigError, match="precision must be one of float32, bfloat16, auto"):
        TrainConfig(precision=bad).validated()
    with pytest.raises(ConfigError, match="precision"):
        fit_cells(gaussian_feature_set, [Cell("linear")], train=TrainConfig(precision=bad))


def test_sweep_config_takes_precision_and_keys_cells_by_it():
    from decouple.sweep import FeatureSpec, cell_key, parse_config

    def config(train):
        return parse_config({"features": ["f.h5"], "grid": {"head": ["linear"], "loss": ["ce"]}, "train": train})

    with pytest.raises(ConfigError, match=r"train\.precision.*one of float32, bfloat16, auto"):
        config({"precision": "half"})
    cell = Cell("linear", "ce", "instance")
    spec = FeatureSpec(path="f.h5", name="f")
    keys = {
        precision: cell_key(cell, spec, "0" * 64, config({"precision": precision}).train_config())
        for precision in ("float32", "bfloat16")
    }
    assert keys["float32"] != keys["bfloat16"]
    auto = config({"precision": "auto", "device": "cpu"}).train_config()
    assert auto.precision in ("float32", "bfloat16")  # resolved, so the key names what ran


def test_precisions_of_the_cli_match_the_library():
    from cli.head import PRECISIONS as CLI_PRECISIONS

    assert CLI_PRECISIONS == PRECISIONS


@pytest.mark.parametrize("name", LOSSES.names())
def test_only_ldam_applies_its_own_scale(name):
    loss = create_loss(name, class_counts=[50, 10, 2])
    assert loss.applies_own_scale is (name == "ldam")


def test_cosine_head_leaves_the_scale_to_a_loss_that_applies_its_own():
    from decouple.heads import create_head

    head = create_head("cosine", scale=16.0)
    counts = [50, 10, 2]
    assert head.training_logit_scale(create_loss("ldam", class_counts=counts, s=30.0)) == 1.0
    assert head.training_logit_scale(create_loss("focal", class_counts=counts)) == 16.0
