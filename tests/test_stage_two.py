"""Stage two on long-tailed Gaussian features: the acceptance numbers, fused
training, selection on val and reproducibility."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from decouple.errors import ConfigError, DecoupleError, UnknownNameError
from decouple.features import FeatureSet, Split
from decouple.stage_two.losses import create_loss
from decouple.stage_two.samplers import create_sampler
from decouple.stage_two.cells import Cell, CellResult, method_params, validate_cell
from decouple.stage_two.config import TrainConfig
from decouple.stage_two.fit import fit_cell, fit_cells
from decouple.stage_two.heads import LinearFamily
from decouple.stage_two.trainer import PreparedData, train_heads
from decouple.synthetic import gaussian_long_tailed, nearest_mean_accuracy

CHANCE = 1 / 20

ACCEPTANCE_CELLS = {
    "ce": Cell("linear", "ce", "instance"),
    "balanced_softmax": Cell("linear", "balanced_softmax", "instance"),
    "logit_adjusted": Cell("linear", "logit_adjusted", "instance"),
    "class_balanced": Cell("linear", "class_balanced", "instance"),
    "ldam": Cell("linear", "ldam", "instance"),
    "tau_norm": Cell("tau_norm", "ce", "instance"),
    "lws": Cell("lws", "ce", "instance"),
    "cosine": Cell("cosine", "ce", "instance"),
    "cosine_ldam": Cell("cosine", "ldam", "instance"),
    "class_balanced_sampler": Cell("linear", "ce", "class_balanced"),
    "ncm": Cell("ncm"),
    "knn": Cell("knn"),
}


@pytest.fixture(scope="module")
def acceptance(gaussian_feature_set):
    """name -> CellResult, all cells fitted in one fit_cells call (default TrainConfig)."""
    results = fit_cells(gaussian_feature_set, list(ACCEPTANCE_CELLS.values()))
    return dict(zip(ACCEPTANCE_CELLS, results))


def test_every_method_lies_between_chance_and_the_bayes_rule(acceptance, gaussian_data):
    # The nearest true mean is the Bayes classifier of the balanced test
    # split: no method can beat it beyond sampling noise (2,000 test images:
    # a standard error of about 1 point), and none may fall near chance.
    feature_set, means = gaussian_data
    test = feature_set.splits["test"]
    bayes = nearest_mean_accuracy(test.features, test.labels, means)
    assert 0.8 <= bayes <= 0.9  # the data is what the thresholds below assume
    for name, result in acceptance.items():
        metrics = result.metrics["test"]
        assert 5 * CHANCE < metrics["top1"] <= bayes + 0.03, (name, metrics["top1"], bayes)
        assert metrics["few"] <= bayes + 0.05, (name, metrics["few"], bayes)
        assert metrics["many"] is not None and metrics["medium"] is not None and metrics["few"] is not None


@pytest.mark.parametrize("method", ["balanced_softmax", "logit_adjusted"])
def test_logit_adjusting_losses_beat_ce(acceptance, method):
    ce, better = acceptance["ce"].metrics["test"], acceptance[method].metrics["test"]
    assert better["top1"] >= ce["top1"] + 0.04
    assert better["few"] >= ce["few"] + 0.15


def test_ncm_comes_near_the_bayes_rule(acceptance, gaussian_data):
    feature_set, means = gaussian_data
    test = feature_set.splits["test"]
    bayes = nearest_mean_accuracy(test.features, test.labels, means)
    # The gap is the estimation error of 5-image tail means: the nearest
    # *empirical* mean scores no better than ncm here.
    assert acceptance["ncm"].metrics["test"]["top1"] >= bayes - 0.08


@pytest.mark.parametrize("method", ["tau_norm", "lws", "class_balanced", "ldam", "class_balanced_sampler"])
def test_rebalancing_methods_raise_few_shot_accuracy(acceptance, method):
    assert acceptance[method].metrics["test"]["few"] >= acceptance["ce"].metrics["test"]["few"] + 0.03


@pytest.fixture(scope="module")
def ldam_data():
    """30 long-tailed Gaussian classes, 500 down to 5 training images."""
    return gaussian_long_tailed(num_classes=30, seed=0)[0]


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_ldam_raises_few_shot_accuracy_as_its_paper_does(ldam_data, head):
    # Cao et al. 2019: LDAM-DRW lifts the rare classes well above
    # cross-entropy on the same classifier.
    ce, ldam = fit_cells(ldam_data, [Cell(head, "ce"), Cell(head, "ldam")])
    assert ldam.metrics["test"]["few"] >= ce.metrics["test"]["few"] + 0.05
    # On fixed features the re-weighting starts at half the run, and the
    # chosen epoch comes after it began.
    assert ldam.params["loss"]["drw_fraction"] == 0.5
    assert ldam.params["epoch"] > int(0.5 * ldam.params["train"]["epochs"])


def test_no_method_is_near_chance(acceptance):
    for name, result in acceptance.items():
        assert result.metrics["test"]["top1"] > 5 * CHANCE, name


def test_results_record_choices_made_on_val(acceptance, gaussian_feature_set):
    n_train = len(gaussian_feature_set.splits["train"])
    epochs = max(10, -(-600 // -(-n_train // 512)))  # the default budget, by hand
    for name, result in acceptance.items():
        assert set(result.metrics) == {"val", "test"}
        if result.head in ("ncm", "knn"):
            assert result.loss is None and result.sampler is None
            continue
        assert result.params["selected_on"] == "val"
        assert result.params["train"]["epochs"] == epochs
        assert 1 <= result.params["epoch"] <= epochs
    assert 0.0 <= acceptance["tau_norm"].params["tau"] <= 2.0


@pytest.mark.parametrize("head, scale", [("linear", 1.0), ("tau_norm", 1.0), ("lws", 1.0), ("cosine", 30.0)])
def test_ldam_uses_one_scale_per_head_family(gaussian_feature_set, head, scale):
    # One rule: s = 1 on every head of the linear family (unbounded logits),
    # the paper's s = 30 on cosine logits; a value set in params wins.
    result = fit_cell(gaussian_feature_set, Cell(head, "ldam"), train=_small_train(2))
    assert result.params["loss"]["s"] == scale
    chosen = fit_cell(gaussian_feature_set, Cell(head, "ldam", params={"ldam": {"s": 4.0}}), train=_small_train(2))
    assert chosen.params["loss"]["s"] == 4.0


def test_tau_norm_and_lws_start_from_the_linear_heads_weights(gaussian_feature_set):
    # Fused in one pass: the linear-family heads with one loss share one
    # trained weight matrix, whatever the loss (ldam included).
    from decouple.stage_two.heads import create_head

    for loss in ("ce", "ldam"):
        linear, tau, lws = fit_cells(
            gaussian_feature_set,
            [Cell("linear", loss), Cell("tau_norm", loss, params={"tau_norm": {"taus": [0.0]}}),
             Cell("lws", loss)],
            train=_small_train(3),
        )
        assert linear.params["loss"] == tau.params["loss"] == lws.params["loss"]
        assert linear.params["epoch"] == tau.params["epoch"] == lws.params["epoch"]
        # tau = 0 leaves the trained weights as they are, less the bias.
        train_split, val_split = gaussian_feature_set.splits["train"], gaussian_feature_set.splits["val"]
        heads = {}
        for name, params in (("linear", {}), ("tau_norm", {"taus": [0.0]})):
            heads[name] = create_head(name, **params).fit(
                train_split.features, train_split.labels, X_val=val_split.features, y_val=val_split.labels,
                loss=loss, train=_small_train(3),
            )
        np.testing.assert_allclose(heads["tau_norm"].coef_, heads["linear"].coef_, rtol=1e-6, atol=1e-7)


def test_to_json_is_designs_object(acceptance):
    record = acceptance["balanced_softmax"].to_json()
    assert list(record) == ["features", "head", "loss", "sampler", "seed", "params", "fit_seconds", "metrics",
                            "predictions"]
    assert set(record["predictions"]) == set(record["metrics"])
    assert record["loss"] == "balanced_softmax" and record["sampler"] == "instance"
    for key in ("n", "top1", "top5", "macro_f1", "many", "medium", "few"):
        assert key in record["metrics"]["test"]
    import json

    json.dumps(record)  # plain JSON values only


def _small_train(epochs: int = 4) -> TrainConfig:
    return TrainConfig(epochs=epochs, device="cpu")


def test_fused_training_equals_separate_training(gaussian_feature_set):
    data = PreparedData.from_arrays(
        gaussian_feature_set.splits["train"].features,
        gaussian_feature_set.splits["train"].labels,
        val_features=gaussian_feature_set.splits["val"].features,
        val_labels=gaussian_feature_set.splits["val"].labels,
    )
    counts = data.class_counts
    names = ["ce", "balanced_softmax", "ldam", "focal", "equalization"]  # equalization draws its own
    labels = gaussian_feature_set.splits["train"].labels

    def sampler():
        return create_sampler("square_root", labels, total_epochs=4, seed=3)

    fused = train_heads(data, [create_loss(n, class_counts=counts) for n in names],
                        sampler=sampler(), family=LinearFamily(), seed=3, train=_small_train())
    for name, together in zip(names, fused):
        alone = train_heads(data, [create_loss(name, class_counts=counts)],
                            sampler=sampler(), family=LinearFamily(), seed=3, train=_small_train())[0]
        assert together.epoch == alone.epoch
        torch.testing.assert_close(together.params["weight"], alone.params["weight"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(together.params["bias"], alone.params["bias"], rtol=1e-4, atol=1e-5)


def test_same_seed_same_numbers_and_other_seed_differs(gaussian_feature_set):
    cells = [Cell("linear", "focal", "progressive", seed=1), Cell("lws", "equalization", seed=1)]
    first = fit_cells(gaussian_feature_set, cells, train=_small_train())
    second = fit_cells(gaussian_feature_set, cells, train=_small_train())
    for a, b in zip(first, second):
        assert a.metrics == b.metrics
        assert a.params == b.params
    other = fit_cell(gaussian_feature_set, dataclasses.replace(cells[0], seed=2), train=_small_train())
    assert other.metrics["val"]["per_class"] != first[0].metrics["val"]["per_class"]


def test_fit_cells_keeps_order_and_reports_each_result(gaussian_feature_set):
    cells = [Cell("knn"), Cell("linear", "ce"), Cell("tau_norm", "ce"), Cell("cosine", "focal", "square_root")]
    seen = []
    results = fit_cells(gaussian_feature_set, cells, train=_small_train(), on_result=seen.append)
    assert [r.head for r in results] == ["knn", "linear", "tau_norm", "cosine"]
    assert sorted(id(r) for r in seen) == sorted(id(r) for r in results)
    assert all(isinstance(r, CellResult) and r.fit_seconds >= 0 for r in results)


def test_test_split_never_influences_the_fit(gaussian_feature_set):
    scrambled = FeatureSet(
        class_names=gaussian_feature_set.class_names,
        splits={
            "train": gaussian_feature_set.splits["train"],
            "val": gaussian_feature_set.splits["val"],
            "test": Split(
                features=gaussian_feature_set.splits["test"].features,
                labels=np.random.default_rng(0).permutation(gaussian_feature_set.splits["test"].labels),
            ),
        },
    )
    cells = [Cell("tau_norm", "ce"), Cell("lws", "balanced_softmax")]
    original = fit_cells(gaussian_feature_set, cells, train=_small_train())
    changed = fit_cells(scrambled, cells, train=_small_train())
    for a, b in zip(original, changed):
        assert a.params == b.params
        assert a.metrics["val"] == b.metrics["val"]


def test_without_val_the_last_epoch_is_kept(gaussian_feature_set):
    no_val = FeatureSet(
        class_names=gaussian_feature_set.class_names,
        splits={name: gaussian_feature_set.splits[name] for name in ("train", "test")},
    )
    linear, tau = fit_cells(no_val, [Cell("linear", "ce"), Cell("tau_norm", "ce")], train=_small_train(3))
    assert linear.params["selected_on"] == "last_epoch" and linear.params["epoch"] == 3
    assert tau.params["tau"] == 1.0
    assert list(linear.metrics) == ["test"]


def test_validate_cell_fills_defaults_and_rejects_nonsense():
    assert validate_cell(Cell("linear")) == Cell("linear", "ce", "instance")
    assert validate_cell(Cell("ncm")) == Cell("ncm", None, None)
    with pytest.raises(DecoupleError, match="ncm.*takes no loss"):
        validate_cell(Cell("ncm", loss="ce"))
    with pytest.raises(DecoupleError, match="knn.*takes no sampler"):
        validate_cell(Cell("knn", sampler="instance"))
    for cell, kind in ((Cell("linaer"), "head"), (Cell("linear", "cee"), "loss"), (Cell("linear", "ce", "inst"), "sampler")):
        with pytest.raises(UnknownNameError, match=f"unknown {kind}.*known"):
            validate_cell(cell)
    with pytest.raises(ConfigError, match="seed"):
        validate_cell(Cell("linear", seed=-1))


def test_params_reach_the_right_method():
    cell = validate_cell(Cell("knn", params={"knn": {"k": 3}, "focal": {"gamma": 1.0}}))
    assert method_params(cell)["head"] == {"k": 3}
    both = validate_cell(Cell("linear", "class_balanced", "class_balanced",
                              params={"class_balanced": {"beta": 0.99}}))
    assert method_params(both)["loss"] == {"beta": 0.99}
    assert method_params(both)["sampler"] == {}


def test_bad_settings_fail_before_training(gaussian_feature_set):
    with pytest.raises(ConfigError, match="gama"):
        fit_cells(gaussian_feature_set, [Cell("linear", "focal", params={"focal": {"gama": 1}})])
    with pytest.raises(ConfigError, match="optimizer"):
        fit_cells(gaussian_feature_set, [Cell("linear")], train=TrainConfig(optimizer="adamax"))
    with pytest.raises(ConfigError, match="epochs"):
        fit_cells(gaussian_feature_set, [Cell("linear")], train=TrainConfig(epochs=0))


def test_adamw_trains(gaussian_feature_set):
    result = fit_cell(gaussian_feature_set, Cell("linear", "balanced_softmax"),
                      train=TrainConfig(epochs=5, optimizer="adamw", lr=0.01, weight_decay=1e-4, device="cpu"))
    assert result.metrics["test"]["top1"] > 0.5
