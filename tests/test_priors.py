"""Deployment priors (LADE's prior correction, Hong et al., CVPR 2021): the
prior each method assumes, scores moved to a target prior, ``views`` such
as test_lt@train in results and sweeps, and ``--target-prior`` on the
command line and on a saved model."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from decouple.deploy.model import DecoupleModel
from decouple.errors import ConfigError, DataError, DecoupleError
from decouple.features import FeatureSet, Split, write_features
from decouple.metrics import evaluate
from decouple.stage_two.cells import Cell
from decouple.stage_two.config import TrainConfig
from decouple.stage_two.fit import fit_cells
from decouple.stage_two.heads import create_head
from decouple.stage_two.priors import assumed_prior, read_prior_file, shift_scores
from decouple.study.config import parse_config
from decouple.study.yaml_lines import parse_yaml
from decouple.synthetic import gaussian_long_tailed

FAST = TrainConfig(epochs=5, device="cpu")
COUNTS = np.array([400, 100, 25, 4])


def _log(values):
    values = np.asarray(values, dtype=np.float64)
    return np.log(values / values.sum())


@pytest.mark.parametrize("head, loss, sampler, expected", [
    ("linear", "ce", "instance", ("train", _log(COUNTS))),
    ("linear", "focal", "instance", ("train", _log(COUNTS))),
    ("cosine", "ce", "instance", ("train", _log(COUNTS))),
    ("linear", "ce", "class_balanced", ("uniform", _log(np.ones(4)))),
    ("linear", "ce", "progressive", ("uniform", _log(np.ones(4)))),  # its last epoch is class-balanced
    ("linear", "ce", "square_root", ("sampler:square_root", _log(np.sqrt(COUNTS)))),
    # tail_below 20: the 4-image class is topped up to the smallest head class's 25.
    ("linear", "ce", "calibrated_features", ("sampler:calibrated_features", _log([400, 100, 25, 25]))),
    ("linear", "balanced_softmax", "instance", ("uniform", _log(np.ones(4)))),
    ("linear", "logit_adjusted", "square_root", ("uniform", _log(np.ones(4)))),
    ("tau_norm", "ce", "instance", ("uniform", _log(np.ones(4)))),
    ("posthoc_la", "ce", "instance", ("uniform", _log(np.ones(4)))),
    ("lws", "ce", "instance", ("uniform", _log(np.ones(4)))),
    ("disalign", "ce", "instance", ("uniform", _log(np.ones(4)))),
    ("ncm", None, None, ("uniform", _log(np.ones(4)))),
    ("knn", None, None, ("train", _log(COUNTS))),
])
def test_each_method_assumes_the_prior_of_its_rule(head, loss, sampler, expected):
    prior = assumed_prior(create_head(head), loss, sampler, COUNTS, total_epochs=4)
    assert prior.name == expected[0]
    np.testing.assert_allclose(prior.log_probabilities, expected[1], rtol=1e-12, atol=1e-12)


def test_scores_move_by_the_log_ratio_of_the_priors_in_calibrated_units():
    """Logits: s + T (log pi_t - log pi_a); probabilities: Bayes' rule."""
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 0.5, 0.5]], dtype=np.float32)
    log_target, log_assumed = np.log([0.5, 0.3, 0.2]), np.log([1 / 3] * 3)
    moved = shift_scores(logits, log_target, log_assumed, 2.0)
    expected = logits + 2.0 * (np.log([0.5, 0.3, 0.2]) - np.log(1 / 3))
    np.testing.assert_allclose(moved, expected, rtol=1e-6)
    assert moved.dtype == np.float32
    votes = np.array([[0.6, 0.4, 0.0], [0.1, 0.1, 0.8]])
    moved = shift_scores(votes, np.log([0.2, 0.4, 0.4]), np.log([0.5, 0.25, 0.25]), 0.1, probabilities=True)
    # p * (pi_t / pi_a) = [0.6 * 0.4, 0.4 * 1.6, 0] -> [0.24, 0.64, 0] / 0.88
    np.testing.assert_allclose(moved[0], [0.24 / 0.88, 0.64 / 0.88, 0.0], rtol=1e-12)
    np.testing.assert_allclose(moved.sum(axis=1), 1.0, rtol=1e-12)


def test_prior_files_are_json_or_csv_of_class_weights(tmp_path):
    names = ["cat", "dog", "moth"]
    (tmp_path / "p.json").write_text(json.dumps({"dog": 2, "cat": 1, "moth": 1}))
    np.testing.assert_allclose(read_prior_file(str(tmp_path / "p.json"), names), np.log([0.25, 0.5, 0.25]))
    (tmp_path / "p.csv").write_text("class,weight\ncat,1\ndog,2\nmoth,1\n")
    np.testing.assert_allclose(read_prior_file(str(tmp_path / "p.csv"), names), np.log([0.25, 0.5, 0.25]))
    for text, message in [("cat,1\ndog,2\n", "no weight for 1 classes"), ("cat,1\ndog,0\nmoth,1\n", "must be a number > 0"),
                          ("cat,1\ncat,2\ndog,1\nmoth,1\n", "given twice"), ("cat,1\nbee,1\n", "unknown class 'bee'")]:
        (tmp_path / "bad.csv").write_text(text)
        with pytest.raises(DataError, match=message):
            read_prior_file(str(tmp_path / "bad.csv"), names)
    with pytest.raises(DataError, match="no such prior file"):
        read_prior_file(str(tmp_path / "missing.csv"), names)


def _with_long_tailed_test(feature_set: FeatureSet) -> FeatureSet:
    """The set plus test_lt: test images kept in proportion to the training counts (at least 2 a class)."""
    test = feature_set.splits["test"]
    counts = feature_set.train_counts
    per_class = np.maximum(np.round(np.bincount(test.labels) * counts / counts.max()).astype(int), 2)
    keep = np.concatenate([np.flatnonzero(test.labels == c)[:per_class[c]] for c in range(len(counts))])
    splits = dict(feature_set.splits, test_lt=Split(features=test.features[keep], labels=test.labels[keep]))
    return FeatureSet(class_names=feature_set.class_names, splits=splits, backbone=feature_set.backbone,
                      attrs=dict(feature_set.attrs))


@pytest.fixture(scope="module")
def lt_feature_set(gaussian_data):
    return _with_long_tailed_test(gaussian_data[0])


def test_a_view_is_the_split_scored_with_the_moved_scores(lt_feature_set):
    result = fit_cells(lt_feature_set, [Cell("linear", "balanced_softmax", "instance", 0)],
                       train=TrainConfig(epochs=5, device="cpu", views=("test_lt@train",)), keep_heads=True)[0]
    assert result.params["prior"] == {"assumed": "uniform", "target": None}
    split, counts = lt_feature_set.splits["test_lt"], lt_feature_set.train_counts
    temperature = result.params["calibration"]["temperature"]
    scores = result.fitted_head.decision_function(split.features) + temperature * (
        _log(counts) - _log(np.ones(len(counts))))
    expected = evaluate(split.labels, scores, counts, temperature=temperature)
    assert result.metrics["test_lt@train"]["top1"] == pytest.approx(expected["top1"], abs=1e-12)
    assert result.metrics["test_lt@train"]["nll"] == pytest.approx(expected["nll"], rel=1e-5)
    assert result.predictions["test_lt@train"].labels.shape == split.labels.shape


def test_a_balanced_method_under_the_train_prior_matches_cross_entropy_on_the_long_tailed_test(lt_feature_set):
    """Issue 12's acceptance on held-out Gaussian data: balanced softmax moved
    to the training prior is at least as accurate on test_lt as plain
    cross-entropy, which assumes that prior already (and which the move
    leaves unchanged)."""
    train = TrainConfig(device="cpu", views=("test_lt@train",))
    ce, balanced = fit_cells(lt_feature_set, [Cell("linear", "ce", "instance", 0),
                                              Cell("linear", "balanced_softmax", "instance", 0)], train=train)
    assert ce.metrics["test_lt@train"]["top1"] == ce.metrics["test_lt"]["top1"]
    assert balanced.metrics["test_lt@train"]["top1"] >= ce.metrics["test_lt"]["top1"] - 0.005
    assert balanced.metrics["test_lt@train"]["top1"] > balanced.metrics["test_lt"]["top1"]


def test_a_target_prior_moves_every_split_and_is_recorded(lt_feature_set, tmp_path):
    cells = [Cell("linear", "balanced_softmax", "instance", 0)]
    viewed = fit_cells(lt_feature_set, cells, train=TrainConfig(epochs=5, device="cpu", views=("test@train",)))[0]
    moved = fit_cells(lt_feature_set, cells, train=FAST, target_prior="train")[0]
    assert moved.params["prior"] == {"assumed": "uniform", "target": "train"}
    assert moved.metrics["test"]["top1"] == viewed.metrics["test@train"]["top1"]
    weights = tmp_path / "prior.json"
    weights.write_text(json.dumps({name: 1.0 for name in lt_feature_set.class_names[:3]}))
    with pytest.raises(DataError, match="no weight for"):
        fit_cells(lt_feature_set, cells, train=FAST, target_prior=str(weights))


@pytest.mark.parametrize("views, message", [(("test_lt@nope",), "prior uniform or train"),
                                            (("test_lt",), "<split>@<prior>"), ((3,), "list of <split>@<prior>")])
def test_bad_views_are_refused(views, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(views=views).validated()


def test_sweep_configs_take_views_and_name_a_bad_one():
    text = textwrap.dedent("""
        features: [f.h5]
        grid: {head: [linear], loss: [ce]}
        train: {views: [test_lt@train]}
    """)
    data, places = parse_yaml(text, source="sweep.yaml")
    assert parse_config(data, source="sweep.yaml", _places=places).train_config().views == ("test_lt@train",)
    data, places = parse_yaml(text.replace("@train", "@lt"), source="sweep.yaml")
    with pytest.raises(ConfigError, match=r"line 4: train\.views: .*'test_lt@lt'"):
        parse_config(data, source="sweep.yaml", _places=places)


def test_decouple_head_scores_under_a_target_prior_and_a_view(lt_feature_set, tmp_path):
    path = tmp_path / "lt.h5"
    write_features(path, lt_feature_set)
    result = CliRunner().invoke(cli, ["head", "--features", str(path), "--loss", "balanced_softmax", "--epochs", "3",
                                      "--view", "test_lt@train", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert "test_lt@train" in record["metrics"] and record["params"]["prior"]["assumed"] == "uniform"
    moved = CliRunner().invoke(cli, ["head", "--features", str(path), "--loss", "balanced_softmax", "--epochs", "3",
                                     "--target-prior", "train", "--json"])
    assert moved.exit_code == 0, moved.output
    assert json.loads(moved.output)["metrics"]["test_lt"]["top1"] == record["metrics"]["test_lt@train"]["top1"]
    bad = CliRunner().invoke(cli, ["head", "--features", str(path), "--target-prior", str(tmp_path / "none.csv")])
    assert bad.exit_code != 0 and "no such prior file" in bad.output


class _Embedding(torch.nn.Module):
    def forward(self, images):
        return images.flatten(1)[:, :2]


def _model(scorer, meta_prior):
    model = DecoupleModel(torch.nn.Identity(), scorer, temperature=2.0, class_names=["a", "b", "c"],
                          preprocess={"input_size": [1, 1, 2], "mean": [0.0], "std": [1.0]},
                          meta={"prior": meta_prior} if meta_prior else {})
    model.embed = lambda images: images.flatten(1)  # the scorer sees the "images" as embeddings
    return model


def test_a_saved_model_moves_its_logits_to_the_target_prior(tmp_path):
    scorer = torch.nn.Linear(2, 3)
    prior = {"assumed": "uniform", "log_assumed": list(np.log([1 / 3] * 3)), "train_counts": [70, 20, 10],
             "scores_are_probabilities": False}
    model = _model(scorer, prior)
    images = torch.randn(4, 1, 1, 2)
    with torch.no_grad():
        base = model(images)
        moved = model.set_target_prior("train")(images)
        expected = base + torch.tensor(np.log([0.7, 0.2, 0.1]) - np.log(1 / 3), dtype=torch.float32)
        torch.testing.assert_close(moved, expected)
        (tmp_path / "p.json").write_text(json.dumps({"a": 1, "b": 1, "c": 1}))
        torch.testing.assert_close(model.set_target_prior(str(tmp_path / "p.json"))(images), base)
        torch.testing.assert_close(model.set_target_prior(None)(images), base)
    with pytest.raises(DecoupleError, match="records no assumed prior"):
        _model(scorer, None).set_target_prior("train")
