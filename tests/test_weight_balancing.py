"""Weight balancing (Alshammari et al., CVPR 2022) on the linear family's
heads: the MaxNorm projection, the per-head weight decay, and sweeps that
grid over both (``vary:``) and choose among them on val."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from decouple.errors import ConfigError
from decouple.features import write_features
from decouple.stage_two.cells import Cell
from decouple.stage_two.config import TrainConfig
from decouple.stage_two.fit import fit_cells
from decouple.stage_two.heads import LinearFamily, create_head
from decouple.study.config import parse_config
from decouple.study.export import labelled_methods
from decouple.study.plan import plan_sweep
from decouple.study.ranking import rank_methods
from decouple.study.runner import run_sweep
from decouple.study.store import ResultStore
from decouple.study.yaml_lines import parse_yaml
from decouple.synthetic import gaussian_long_tailed

FAST = TrainConfig(epochs=5, device="cpu")


def test_max_norm_projects_each_class_row_onto_the_ball():
    """Rows longer than max_norm are scaled to exactly max_norm, shorter ones
    and the bias are left alone: w_c * min(1, max_norm / ||w_c||), the
    projection of the authors' MaxNorm_via_PGD (utils/regularizers.py) with
    an absolute threshold (their code, run on these tensors, agrees to 3e-8)."""
    weight = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0], [-6.0, 8.0]])
    bias = torch.tensor([5.0, -5.0, 1.0, 2.0])
    params = {"weight": weight.clone(), "bias": bias.clone()}
    LinearFamily(max_norm=1.0).project(params)
    expected = np.array([[0.6, 0.8], [0.3, 0.4], [0.0, 0.0], [-0.6, 0.8]])
    np.testing.assert_allclose(params["weight"].numpy(), expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(params["bias"], bias)
    unconstrained = {"weight": weight.clone(), "bias": bias.clone()}
    LinearFamily().project(unconstrained)
    assert torch.equal(unconstrained["weight"], weight)


def _standardised_norms(head) -> np.ndarray:
    """||w_c|| of the head's weights in the standardised space it was trained in."""
    active = head.scale_ > 0
    return np.linalg.norm(head.coef_[:, active] / head.scale_[active], axis=1)


def test_a_fitted_head_keeps_every_class_weight_within_max_norm(gaussian_feature_set):
    train, val = gaussian_feature_set.splits["train"], gaussian_feature_set.splits["val"]
    free = create_head("linear").fit(train.features, train.labels, X_val=val.features, y_val=val.labels, train=FAST)
    cap = 0.5 * float(_standardised_norms(free).max())
    capped = create_head("linear", max_norm=cap).fit(train.features, train.labels, X_val=val.features,
                                                       y_val=val.labels, train=FAST)
    assert (_standardised_norms(free) > cap * 1.01).any()
    assert (_standardised_norms(capped) <= cap * (1 + 1e-4)).all()
    assert capped.get_params()["max_norm"] == cap


def test_the_head_weight_decay_is_the_training_configs_weight_decay_for_that_head(gaussian_feature_set):
    """weight_decay as a head parameter trains exactly what the same value in
    the training config does; it only moves the one head."""
    cells = [Cell("linear", "ce", "instance", 0, params={"linear": {"weight_decay": 0.05}}),
             Cell("tau_norm", "ce", "instance", 0)]
    by_head = {result.head: result for result in fit_cells(gaussian_feature_set, cells, train=FAST, keep_heads=True)}
    config_decay = fit_cells(gaussian_feature_set, [Cell("linear", "ce", "instance", 0)],
                             train=TrainConfig(epochs=5, device="cpu", weight_decay=0.05), keep_heads=True)[0]
    default = fit_cells(gaussian_feature_set, [Cell("linear", "ce", "instance", 0)], train=FAST, keep_heads=True)[0]
    np.testing.assert_array_equal(by_head["linear"].fitted_head.coef_, config_decay.fitted_head.coef_)
    assert not np.array_equal(by_head["linear"].fitted_head.coef_, default.fitted_head.coef_)
    # tau_norm kept the default decay: its weights are linear's at the default.
    assert by_head["tau_norm"].fitted_head.epoch_ == default.fitted_head.epoch_


@pytest.mark.parametrize("setting, value", [("max_norm", 0), ("max_norm", -1.0), ("max_norm", "big"),
                                            ("weight_decay", -1e-3), ("weight_decay", float("nan")),
                                            ("max_norm", True)])
def test_bad_weight_balancing_settings_are_refused_before_training(gaussian_feature_set, setting, value):
    with pytest.raises(ConfigError, match=f"{setting} of linear"):
        fit_cells(gaussian_feature_set, [Cell("linear", "ce", "instance", 0, params={"linear": {setting: value}})],
                  train=FAST)


def test_weight_balancing_lifts_few_shot_accuracy_over_its_cross_entropy_base(gaussian_feature_set):
    """Issue 12's acceptance on the held-out Gaussian long-tailed data: the
    authors' stage two (class-balanced loss, weight decay, MaxNorm) at least
    5 points of few-shot accuracy over CE on a linear head, without collapse."""
    balanced = {"linear": {"max_norm": 1.0, "weight_decay": 5e-3}}
    base, weight_balanced = fit_cells(gaussian_feature_set, [
        Cell("linear", "ce", "instance", 0), Cell("linear", "class_balanced", "instance", 0, params=balanced)])
    assert weight_balanced.metrics["test"]["few"] >= base.metrics["test"]["few"] + 0.05
    assert weight_balanced.metrics["test"]["mean_class_acc"] > base.metrics["test"]["mean_class_acc"]


# ---------------------------------------------------------------------------
# vary: in sweep configs.
# ---------------------------------------------------------------------------


def _config(text: str):
    data, places = parse_yaml(textwrap.dedent(text).lstrip("\n"), source="sweep.yaml")
    return parse_config(data, source="sweep.yaml", _places=places)


GRID = """
    features: [f.h5]
    grid: {head: [linear, tau_norm, ncm], loss: [ce, class_balanced], sampler: [instance, class_balanced]}
"""


def test_vary_runs_each_cell_of_the_method_once_per_combination():
    config = _config(GRID + """
    vary:
      linear: {max_norm: [null, 0.5], weight_decay: [5.0e-4, 5.0e-3, 5.0e-2]}
      class_balanced: {beta: [0.99, 0.9999]}
    """)
    cells = [cell for _, cell in config.cells()]
    linear_cb = [cell.params for cell in cells if (cell.head, cell.loss, cell.sampler) ==
                 ("linear", "class_balanced", "instance")]
    assert len(linear_cb) == 2 * 3 * 2
    assert {(p["linear"]["max_norm"], p["linear"]["weight_decay"], p["class_balanced"]["beta"])
            for p in linear_cb} == {(m, w, b) for m in (None, 0.5) for w in (5e-4, 5e-3, 5e-2) for b in (0.99, 0.9999)}
    # beta is the loss's: a cell that only samples class-balanced gets no beta, so no copies.
    assert len([c for c in cells if (c.head, c.loss, c.sampler) == ("linear", "ce", "class_balanced")]) == 6
    assert len([c for c in cells if (c.head, c.loss, c.sampler) == ("tau_norm", "class_balanced", "instance")]) == 2
    assert len([c for c in cells if c.head == "ncm"]) == 1
    assert "vary" in config.to_json() and "vary" not in _config(GRID).to_json()


@pytest.mark.parametrize("text, place, message", [
    ("vary: {lws: {max_norm: [1.0]}}", "vary.lws", "not in the grid"),
    ("vary: {linear: {max_nrom: [1.0]}}", "vary.linear.max_nrom", "did you mean 'max_norm'"),
    ("vary: {linear: {max_norm: 1.0}}", "vary.linear.max_norm", "non-empty list"),
    ("vary: {linear: {max_norm: []}}", "vary.linear.max_norm", "non-empty list"),
    ("vary: {linear: {max_norm: [1.0, 1.0]}}", "vary.linear.max_norm", "twice"),
    ("vary: {linear: {max_norm: [1.0, -2.0]}}", "vary.linear.max_norm", "must be a number > 0"),
    ("params: {linear: {max_norm: 1.0}}\nvary: {linear: {max_norm: [2.0]}}", "vary.linear.max_norm", "one place"),
])
def test_bad_vary_entries_name_their_place(text, place, message):
    with pytest.raises(ConfigError) as error:
        _config(GRID + textwrap.indent(text, "    "))
    assert place in str(error.value) and message in str(error.value)


def _toy_sweep(tmp_path, settings: str, **data):
    """A sweep config over a small Gaussian long-tailed file (``data``: its
    shape) written to tmp_path/toy.h5, with ``settings`` (grid, vary, train)
    and its database in tmp_path/results.db."""
    feature_set, _ = gaussian_long_tailed(**data)
    write_features(tmp_path / "toy.h5", feature_set)
    return _config(f"features: [{tmp_path / 'toy.h5'}]\n" + textwrap.dedent(settings)
                   + f"db: {tmp_path / 'results.db'}\n")


def _records(tmp_path):
    with ResultStore.open_existing(tmp_path / "results.db") as store:
        return store.records()


def test_a_swept_max_norm_is_labelled_and_chosen_on_val(tmp_path):
    """Cells that vary: tells apart are separate methods in tables, and the
    ranking that recommend and save-model use picks among them on val."""
    run_sweep(_toy_sweep(tmp_path, """
        grid: {head: [linear], loss: [class_balanced], seed: [0, 1]}
        vary: {linear: {max_norm: [0.2, 1.0, null]}}
        train: {epochs: 3}
    """, num_classes=12, dim=8, n_max=200, imbalance_factor=100, n_val=8, n_test=15, seed=3))
    records = _records(tmp_path)
    assert len(records) == 6
    heads = sorted({label["head"] for label in labelled_methods(records)})
    assert heads == ["linear (max_norm=0.2)", "linear (max_norm=1.0)", "linear (max_norm=null)"]
    ranked = rank_methods(records, metric="mean_class_acc", split="val")
    val_means = {method.label["head"]: np.mean([r.metrics["val"]["mean_class_acc"] for r in method.records])
                 for method in ranked}
    assert ranked[0].label["head"] == max(val_means, key=val_means.get)


def test_the_dry_run_labels_each_varied_cell_with_its_settings(tmp_path):
    config = _toy_sweep(tmp_path, """
        grid: {head: [linear, ncm], loss: [ce]}
        vary: {linear: {max_norm: [0.5, null]}}
    """, num_classes=6, dim=4, n_max=50, imbalance_factor=10, n_val=4, n_test=4, seed=1)
    labels = [planned.label for planned in plan_sweep(config).pending]
    assert labels == ["toy / linear / ce / instance / seed 0 (max_norm=0.5)",
                      "toy / linear / ce / instance / seed 0 (max_norm=null)", "toy / ncm / seed 0"]


def test_decouple_head_takes_method_settings(tmp_path, gaussian_feature_set):
    """``--param METHOD.KEY=VALUE`` sets what a sweep's params: would: weight
    balancing on the command line, recorded in the result; a method that is
    not the cell's, a malformed option and an unknown key are refused."""
    path = tmp_path / "g.h5"
    write_features(path, gaussian_feature_set)
    run = CliRunner().invoke(cli, ["head", "--features", str(path), "--loss", "class_balanced", "--epochs", "3",
                                   "--param", "linear.max_norm=1.0", "--param", "linear.weight_decay=5e-3",
                                   "--param", "class_balanced.beta=0.99", "--json"])
    assert run.exit_code == 0, run.output
    params = json.loads(run.output)["params"]
    assert params["head"] == {"max_norm": 1.0, "weight_decay": 5e-3} and params["loss"]["beta"] == 0.99
    for bad, message in [(["--param", "focal.gamma=1"], "not this cell's head, loss or sampler"),
                         (["--param", "linear.max_norm"], "METHOD.KEY=VALUE"),
                         (["--param", "linear.max_nrom=1"], "max_nrom"),
                         (["--param", "instance.seed=3"], "takes no setting 'seed'")]:
        result = CliRunner().invoke(cli, ["head", "--features", str(path), "--epochs", "1", *bad])
        assert result.exit_code != 0 and message in result.output, result.output


def test_a_head_setting_named_like_a_training_setting_still_tells_methods_apart(tmp_path):
    """The head's weight_decay (and lws's epochs) are not hidden by the
    training config's settings of the same name: varied, they are separate
    methods in tables and in the val ranking, never averaged as seeds."""
    run_sweep(_toy_sweep(tmp_path, """
        grid: {head: [linear, lws], loss: [ce]}
        vary: {linear: {weight_decay: [5.0e-4, 0.5]}, lws: {epochs: [1, 3]}}
        train: {epochs: 3}
    """, num_classes=8, dim=6, n_max=80, imbalance_factor=10, n_val=6, n_test=10, seed=4))
    records = _records(tmp_path)
    labels = sorted(label["head"] for label in labelled_methods(records))
    assert labels == ["linear (head.weight_decay=0.0005)", "linear (head.weight_decay=0.5)",
                      "lws (head.epochs=1)", "lws (head.epochs=3)"]
    assert len(rank_methods(records, metric="mean_class_acc", split="val")) == 4
