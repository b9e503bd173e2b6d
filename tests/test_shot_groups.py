"""The shot-group rule (``groups``: "thresholds", the default, or "thirds")
end to end: a fitted cell, the train setting and its error, cell keys (the
default keys every cell exactly as before the setting existed), the export's
table notes and the plots' captions, and the CLI."""

from __future__ import annotations

import dataclasses
import json
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

from decouple.errors import ConfigError
from decouple.features import write_features
from decouple.metrics import group_mean, shot_groups
from decouple.stage_two.cells import Cell, validate_cell
from decouple.stage_two.config import TrainConfig
from decouple.stage_two.fit import fit_cell
from decouple.study import plots
from decouple.study.config import FeatureSpec, load_config, parse_config
from decouple.study.export import labelled_methods, render, shot_groups_note
from decouple.study.grid import train_identity
from decouple.study.plan import cell_key, plan_sweep
from decouple.study.runner import run_sweep
from decouple.study.store import load_records
from decouple.synthetic import gaussian_long_tailed
from test_results import make_record

THRESHOLDS_NOTE = "Shot groups: many > 100, medium 20-100, few < 20 training images."
THIRDS_NOTE = "Shot groups: many/medium/few: thirds of the classes by training count."


@pytest.fixture(scope="module")
def cifar10_like():
    """Ten classes, 500 -> 50 training rows (imbalance 10): like CIFAR-10-LT,
    no class has fewer than 20 images, so the thresholds leave "few" empty."""
    feature_set, _ = gaussian_long_tailed(num_classes=10, dim=8, n_max=500, imbalance_factor=10,
                                          n_val=10, n_test=20, seed=5)
    assert feature_set.train_counts.min() >= 20
    return feature_set


@pytest.fixture(scope="module")
def features_path(cifar10_like, tmp_path_factory):
    path = tmp_path_factory.mktemp("features") / "c10_like.h5"
    write_features(path, cifar10_like)
    return str(path)


def _fast(**settings) -> TrainConfig:
    return TrainConfig(epochs=2, batch_size=256, device="cpu", **settings)


# ---------------------------------------------------------------------------
# Fitting and metrics.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("head, loss", [("linear", "ce"), ("ncm", None)])
def test_a_cell_fitted_with_thirds_has_a_few_group(cifar10_like, head, loss):
    cell = Cell(head=head, loss=loss, sampler="instance" if loss else None, seed=0)
    default = fit_cell(cifar10_like, cell, train=_fast())
    thirds = fit_cell(cifar10_like, cell, train=_fast(groups="thirds"))
    for split in ("val", "test"):
        assert default.metrics[split]["few"] is None
        per_class = np.array([np.nan if value is None else value for value in thirds.metrics[split]["per_class"]])
        groups = shot_groups(cifar10_like.train_counts, rule="thirds")
        assert [len(groups[name]) for name in ("many", "medium", "few")] == [3, 4, 3]
        for name in ("many", "medium", "few"):
            assert thirds.metrics[split][name] is not None
            assert thirds.metrics[split][name] == pytest.approx(group_mean(per_class, groups[name]))
        # The rule changes the groups, nothing else.
        for name in ("top1", "macro_f1", "per_class"):
            assert thirds.metrics[split][name] == default.metrics[split][name]
    if head == "linear":
        assert thirds.params["train"]["groups"] == "thirds"
        assert default.params["train"]["groups"] == "thresholds"


def test_default_metrics_are_the_threshold_groups(cifar10_like):
    result = fit_cell(cifar10_like, Cell(head="ncm", seed=0), train=_fast())
    counts = cifar10_like.train_counts
    per_class = np.array([np.nan if value is None else value for value in result.metrics["test"]["per_class"]])
    assert result.metrics["test"]["many"] == pytest.approx(group_mean(per_class, np.flatnonzero(counts > 100)))
    medium = np.flatnonzero((counts >= 20) & (counts <= 100))
    assert result.metrics["test"]["medium"] == pytest.approx(group_mean(per_class, medium))


# ---------------------------------------------------------------------------
# The setting and its errors.
# ---------------------------------------------------------------------------


def test_a_bad_rule_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match=r"train setting groups must be one of thresholds, thirds; got 'halves'"):
        TrainConfig(groups="halves").validated()


def test_a_bad_rule_in_a_sweep_config_names_its_line(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(textwrap.dedent("""
        features: [f.h5]
        grid: {head: [ncm]}
        train:
          groups: halves
    """).lstrip("\n"))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "sweep.yaml" in message and "line 4" in message and "groups" in message and "'halves'" in message
    config = parse_config({"features": ["f.h5"], "grid": {"head": ["ncm"]}, "train": {"groups": "thirds"}})
    assert config.train_config().groups == "thirds"


# ---------------------------------------------------------------------------
# Cell identity.
# ---------------------------------------------------------------------------

SPEC = FeatureSpec(path="features/cifar10_lt.h5", name="cifar10_lt")
LINEAR = Cell(head="linear", loss="ce", sampler="instance", seed=0)
NCM = Cell(head="ncm", seed=1)
# cell_key of LINEAR and NCM with TrainConfig(device="cpu").validated(), computed
# by the code before TrainConfig had a `groups` field: the default must not move them.
KEYS_BEFORE_GROUPS = {
    "linear": "7716c129067a15fd4187e4e5fcde8e4d6e9ea7665e74d2065e8cca3dbcebf4ae",
    "ncm": "4cd2895e4f98b389c964aab41e73dafaea8aac54199bc600f60ad907b36c5c8b",
}


@pytest.mark.parametrize("cell", [LINEAR, NCM], ids=["linear", "ncm"])
def test_the_default_rule_leaves_cell_keys_unchanged(cell):
    default = TrainConfig(device="cpu").validated()
    assert "groups" not in train_identity(cell.head, dataclasses.asdict(default))
    assert cell_key(validate_cell(cell), SPEC, "a" * 64, default) == KEYS_BEFORE_GROUPS[cell.head]
    explicit = TrainConfig(device="cpu", groups="thresholds").validated()
    assert cell_key(validate_cell(cell), SPEC, "a" * 64, explicit) == KEYS_BEFORE_GROUPS[cell.head]


@pytest.mark.parametrize("cell", [LINEAR, NCM], ids=["linear", "ncm"])
def test_thirds_is_part_of_every_cells_identity(cell):
    thirds = TrainConfig(device="cpu", groups="thirds").validated()
    assert train_identity(cell.head, dataclasses.asdict(thirds))["groups"] == "thirds"
    assert cell_key(validate_cell(cell), SPEC, "a" * 64, thirds) != KEYS_BEFORE_GROUPS[cell.head]


def test_changing_the_rule_reruns_a_sweeps_cells(tmp_path, features_path):
    def config(train: str) -> str:
        path = tmp_path / f"sweep_{len(train)}.yaml"
        path.write_text(f"features: [{features_path}]\ngrid: {{head: [ncm]}}\ntrain: {train}\n"
                        f"db: {tmp_path / 'results.db'}\n")
        return str(path)

    first = run_sweep(config("{}"))
    assert first.ran == 1
    assert plan_sweep(load_config(config("{groups: thresholds}"))).pending == []  # same cell
    assert len(plan_sweep(load_config(config("{groups: thirds}"))).pending) == 1
    run_sweep(config("{groups: thirds}"))
    records = {record.train.get("groups"): record for record in load_records(str(tmp_path / "results.db"))}
    assert records["thresholds"].metrics["test"]["few"] is None
    assert records["thirds"].metrics["test"]["few"] is not None


# ---------------------------------------------------------------------------
# Tables and plots name the rule.
# ---------------------------------------------------------------------------


def _with_train(record, **train):
    return dataclasses.replace(record, train={**record.train, **train}, cell_key=f"{record.cell_key}-{train}")


def test_the_markdown_footnote_names_the_rule():
    records = [make_record(loss="ce", seed=seed) for seed in (0, 1)]
    assert THRESHOLDS_NOTE in render(records, format="markdown", splits=["test"])
    custom = [_with_train(record, many_threshold=50, few_threshold=10) for record in records]
    assert "Shot groups: many > 50, medium 10-50, few < 10 training images." in render(custom, format="markdown")
    thirds = [_with_train(record, groups="thirds") for record in records]
    markdown = render(thirds, format="markdown", splits=["test"])
    assert THIRDS_NOTE in markdown and THRESHOLDS_NOTE not in markdown
    # No group column, no note on groups.
    assert "Shot groups" not in render(thirds, format="markdown", metrics=["top1"])


def test_latex_and_html_carry_the_note():
    records = [_with_train(make_record(loss="ce", seed=seed), groups="thirds") for seed in (0, 1)]
    latex = render(records, format="latex", splits=["test"])
    assert "% Mean ± sample std over 2 seed(s)" in latex and THIRDS_NOTE in latex
    assert latex.index(THIRDS_NOTE) < latex.index("\\begin{tabular}")
    html = render(records, format="html", splits=["test"])
    assert html.startswith("<table") and "<caption" in html and THIRDS_NOTE in html


def test_mixed_rules_are_said_and_labelled_apart():
    old = make_record(loss="ce", seed=0)  # stored before the setting existed: no "groups"
    new = _with_train(make_record(loss="ce", seed=1), groups="thresholds")
    thirds = _with_train(make_record(loss="ce", seed=0), groups="thirds")
    # An old record and a new default one are the same method (averaged over seeds) ...
    assert labelled_methods([old, new])[0] == labelled_methods([old, new])[1]
    assert THRESHOLDS_NOTE in render([old, new], format="markdown")
    # ... a thirds one is not, and the note says the rules differ.
    labels = labelled_methods([old, new, thirds])
    assert labels[0] == labels[1] and "groups=thirds" in labels[2]["head"] and "groups=thresholds" in labels[0]["head"]
    note = shot_groups_note([old, thirds])
    assert note.startswith("Shot groups differ between cells")
    assert "many > 100, medium 20-100, few < 20 training images" in note and "thirds of the classes" in note
    assert note in render([old, new, thirds], format="markdown")


def test_plots_name_the_rule(tmp_path, monkeypatch):
    captions = []
    original = plots._caption
    monkeypatch.setattr(plots, "_caption", lambda figure, text: (captions.append(text), original(figure, text)))
    records = [_with_train(make_record(loss=loss, seed=seed), groups="thirds")
               for loss in ("ce", "focal") for seed in (0, 1)]
    written = plots.export_plots(records, tmp_path, splits=["test"])
    assert len(written) == 4 and all(path.stat().st_size > 0 for path in written)
    assert captions == [THIRDS_NOTE, THIRDS_NOTE]
    assert plots.group_labels(records)["few"] == "Few (bottom third)"
    assert plots.group_labels([make_record()]) == {"many": "Many (> 100)", "medium": "Medium (20–100)",
                                                   "few": "Few (< 20)"}
    custom = _with_train(make_record(), many_threshold=50, few_threshold=5)
    assert plots.group_labels([custom])["medium"] == "Medium (5–50)"
    assert plots.group_labels([custom, records[0]]) == {"many": "Many", "medium": "Medium", "few": "Few"}


# ---------------------------------------------------------------------------
# The CLI.
# ---------------------------------------------------------------------------


def _cli(*args):
    from cli.main import cli

    return CliRunner().invoke(cli, [str(arg) for arg in args])


def test_head_groups_thirds(features_path):
    result = _cli("head", "--features", features_path, "--epochs", "2", "--device", "cpu",
                  "--groups", "thirds", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["params"]["train"]["groups"] == "thirds"
    assert all(record["metrics"][split]["few"] is not None for split in ("val", "test"))
    readable = _cli("head", "--features", features_path, "--head", "ncm", "--groups", "thirds")
    assert readable.exit_code == 0, readable.output
    assert "shot groups: many/medium/few: thirds of the classes by training count" in readable.output
    default = _cli("head", "--features", features_path, "--head", "ncm")
    assert "shot groups: many > 100, medium 20-100, few < 20 training images" in default.output
    bad = _cli("head", "--features", features_path, "--head", "ncm", "--groups", "halves")
    assert bad.exit_code == 2 and "halves" in bad.output


def test_info_groups_thirds(features_path):
    result = _cli("info", features_path, "--groups", "thirds")
    assert result.exit_code == 0, result.output
    assert "shot groups (thirds of the classes by training count): many 3, medium 4, few 3" in result.output
    default = json.loads(_cli("info", features_path, "--json").output)
    assert default["groups"]["few"] == 0 and default["group_rule"] == "thresholds"
