"""Mixed precision (TrainConfig.precision) in the fused trainer: accuracy
beside float32 on any CPU, reproducibility, what is recorded, "auto" being
float32 on a CPU, bad values; and the losses' applies_own_scale flag the
cosine head relies on."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from decouple.errors import ConfigError
from decouple.stage_two.losses import LOSSES, create_loss
from decouple.stage_two.samplers import create_sampler
from decouple.stage_two.cells import Cell
from decouple.stage_two.config import PRECISIONS, TrainConfig
from decouple.stage_two.fit import fit_cells
from decouple.stage_two.heads import LinearFamily
from decouple.stage_two.trainer import PreparedData, train_heads
from decouple.synthetic import gaussian_long_tailed, nearest_mean_accuracy

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
def separated():
    """(FeatureSet, true class means): long-tailed Gaussian classes so far
    apart (radius 12 against unit noise in 32 dimensions, 500 down to 5
    training rows) that a test image lies more than 8 noise deviations from
    every boundary between its class and another: any correct training
    classifies (almost) all of them, in any precision, on any CPU. (Focal
    loss, which by design stops pushing confident examples, leaves about
    one tail image in a hundred on the prior's side.)"""
    return gaussian_long_tailed(radius=12.0, seed=5)


@pytest.fixture(scope="module")
def by_precision(separated):
    """precision -> results of CELLS on the separated data, default training."""
    return {
        precision: fit_cells(separated[0], CELLS, train=TrainConfig(device="cpu", precision=precision))
        for precision in ("float32", "bfloat16")
    }


def test_bfloat16_scores_like_float32(by_precision, separated):
    # The expected score comes from the data, not from the trainer: the
    # nearest true mean classifies every test image, so must both precisions,
    # cell by cell and shot group by shot group, but for focal's rare miss.
    feature_set, means = separated
    test = feature_set.splits["test"]
    assert nearest_mean_accuracy(test.features, test.labels, means) == 1.0
    for single, mixed in zip(by_precision["float32"], by_precision["bfloat16"]):
        assert (single.head, single.loss, single.sampler) == (mixed.head, mixed.loss, mixed.sampler)
        for result in (single, mixed):
            for metric in ("top1", "many", "medium", "few"):
                score = result.metrics["test"][metric]
                assert score >= 0.98, (result.head, result.loss, result.params["train"]["precision"], metric)


def test_bfloat16_keeps_the_acceptance_margins(gaussian_feature_set):
    results = fit_cells(gaussian_feature_set, CELLS, train=TrainConfig(device="cpu", precision="bfloat16"))
    results = {(r.head, r.loss, r.sampler): r.metrics["test"] for r in results}
    ce = results[("linear", "ce", "instance")]
    balanced = results[("linear", "balanced_softmax", "instance")]
    assert balanced["top1"] >= ce["top1"] + 0.04
    assert balanced["few"] >= ce["few"] + 0.15
    assert results[("cosine", "ldam", "instance")]["few"] >= results[("cosine", "ce", "instance")]["few"] + 0.05


def test_the_precision_used_is_recorded(by_precision):
    for precision, results in by_precision.items():
        for result in results:
            assert result.params["train"]["precision"] == precision
    assert TrainConfig().precision == "auto"  # resolved by validated(), never recorded as "auto"


def test_auto_is_float32_on_any_cpu(gaussian_feature_set):
    # Whatever the CPU's instruction set (AVX512-BF16, AMX, NEON or none).
    train = TrainConfig(device="cpu", epochs=2)
    assert train.precision == "auto"
    assert train.validated().precision == "float32"
    assert train.to_dict()["precision"] == "float32"
    result = fit_cells(gaussian_feature_set, [Cell("linear", "ce")], train=train)[0]
    assert result.params["train"]["precision"] == "float32"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_is_bfloat16_on_a_gpu_that_has_it():
    # bf16 tensor cores arrived with compute capability 8.0 (Ampere).
    expected = "bfloat16" if torch.cuda.get_device_capability() >= (8, 0) else "float32"
    assert TrainConfig(device="cuda").validated().precision == expected


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
                        sampler=sampler(), family=LinearFamily(), seed=3, train=train)
    for name, together in zip(names, fused):
        assert together.params["weight"].dtype == torch.float32 and together.params["bias"].dtype == torch.float32
        alone = train_heads(data, [create_loss(name, class_counts=data.class_counts)],
                            sampler=sampler(), family=LinearFamily(), seed=3, train=train)[0]
        assert together.epoch == alone.epoch
        torch.testing.assert_close(together.params["weight"], alone.params["weight"], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("bad", ["fp16", "bf16", "", None, 16])
def test_a_bad_precision_is_a_config_error(gaussian_feature_set, bad):
    with pytest.raises(ConfigError, match="precision must be one of float32, bfloat16, auto"):
        TrainConfig(precision=bad).validated()
    with pytest.raises(ConfigError, match="precision"):
        fit_cells(gaussian_feature_set, [Cell("linear")], train=TrainConfig(precision=bad))


def test_sweep_config_takes_precision_and_keys_cells_by_it():
    from decouple.study.config import FeatureSpec, parse_config
    from decouple.study.plan import cell_key

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
    from decouple.stage_two.heads import create_head

    head = create_head("cosine", scale=16.0)
    counts = [50, 10, 2]
    assert head.training_logit_scale(create_loss("ldam", class_counts=counts, s=30.0)) == 1.0
    assert head.training_logit_scale(create_loss("focal", class_counts=counts)) == 16.0
