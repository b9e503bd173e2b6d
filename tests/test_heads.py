"""Heads: registry, the scikit-learn estimator contract, and each head's rule."""

from __future__ import annotations

import numpy as np
import pytest

from decouple.errors import ConfigError, UnknownNameError
from decouple.features import Classifier
from decouple.stage_two.heads import DEFAULT_TAUS, HEADS, create_head, list_heads
from decouple.stage_two.config import TrainConfig

FAST = TrainConfig(epochs=5, device="cpu")


def _fit(name, feature_set, head=None, **params):
    train, val = feature_set.splits["train"], feature_set.splits["val"]
    head = head if head is not None else create_head(name, **params)
    if head.trainable:
        return head.fit(train.features, train.labels, X_val=val.features, y_val=val.labels,
                        loss="balanced_softmax", train=FAST)
    return head.fit(train.features, train.labels, classifier=_nearest_mean_classifier(feature_set))


def _nearest_mean_classifier(feature_set):
    """A linear classifier as stage one would store one (for finetuned): nearest class mean by L2."""
    train = feature_set.splits["train"]
    means = np.stack([train.features[train.labels == c].mean(axis=0) for c in range(feature_set.num_classes)])
    return Classifier(weight=means.astype(np.float32), bias=(-0.5 * (means ** 2).sum(axis=1)).astype(np.float32),
                      loss="ce", sampler="instance", trained=True)


def test_registry_lists_the_heads():
    assert [name for name, _ in list_heads()] == [
        "linear", "cosine", "tau_norm", "posthoc_la", "lws", "disalign", "ncm", "knn", "finetuned"]
    assert all(description for _, description in list_heads())
    assert {name for name in HEADS if HEADS.get(name).trainable} == {
        "linear", "cosine", "tau_norm", "posthoc_la", "lws", "disalign"}


def test_unknown_head_and_parameter():
    with pytest.raises(UnknownNameError, match="unknown head 'nmc'.*did you mean 'ncm'.*known heads: linear"):
        create_head("nmc")
    with pytest.raises(ConfigError, match="knn.*takes no parameter 'n_neighbors'"):
        create_head("knn", n_neighbors=3)


@pytest.mark.parametrize("name", HEADS.names())
def test_estimator_contract(name, gaussian_feature_set):
    head = create_head(name)
    assert not [key for key in vars(head) if key.endswith("_")]  # __init__ only stores parameters
    assert head.get_params() == {key: _as_list(value) for key, value in HEADS.parameters(name).items()}
    fitted = _fit(name, gaussian_feature_set, head)
    assert fitted is head
    test = gaussian_feature_set.splits["test"]
    scores = head.decision_function(test.features)
    assert scores.shape == (len(test), gaussian_feature_set.num_classes)
    assert np.isfinite(scores).all()
    predictions = head.predict(test.features)
    assert predictions.shape == (len(test),)
    np.testing.assert_array_equal(predictions, scores.argmax(axis=1))
    assert (predictions == test.labels).mean() > 0.3  # chance is 0.05


def _as_list(value):
    return list(value) if isinstance(value, tuple) else value


def test_linear_coefficients_live_in_the_original_feature_space(gaussian_feature_set):
    head = _fit("linear", gaussian_feature_set)
    X = gaussian_feature_set.splits["test"].features
    np.testing.assert_allclose(head.decision_function(X), X @ head.coef_.T + head.intercept_, rtol=1e-5)
    assert head.coef_.shape == (20, 32) and head.intercept_.shape == (20,)


def test_tau_norm_chooses_tau_on_val_from_the_grid(gaussian_feature_set):
    head = _fit("tau_norm", gaussian_feature_set)
    assert head.tau_ in DEFAULT_TAUS
    assert len(head.tau_scores_) == len(DEFAULT_TAUS)
    assert head.tau_scores_[DEFAULT_TAUS.index(head.tau_)] == max(head.tau_scores_)
    # The rule acts on the weights as trained, in the standardised feature
    # space: coef_ = W diag(scale_) there.
    fixed = _fit("tau_norm", gaussian_feature_set, taus=[0.0])
    norms = np.linalg.norm(fixed.coef_ / fixed.scale_, axis=1)
    assert fixed.tau_ == 0.0 and norms.std() > 0
    unit = _fit("tau_norm", gaussian_feature_set, taus=[1.0])
    norms = np.linalg.norm(unit.coef_ / unit.scale_, axis=1)
    np.testing.assert_allclose(norms, norms[0], rtol=1e-4)  # tau = 1: equal norms


def test_posthoc_la_is_the_linear_head_minus_tau_log_prior_with_tau_chosen_on_val(gaussian_feature_set):
    """Menon et al. 2021, eq. 9: f_y(x) - tau log pi_y on the linear head's
    own logits (the same weights: same loss, sampler and seed), tau the val
    best of the grid by mean class accuracy, computed here independently."""
    train, val, test = (gaussian_feature_set.splits[name] for name in ("train", "val", "test"))
    linear = _fit("linear", gaussian_feature_set)
    adjusted = _fit("posthoc_la", gaussian_feature_set)
    prior = np.bincount(train.labels) / len(train.labels)
    base_val = linear.decision_function(val.features).astype(np.float64)
    scores = []
    for tau in DEFAULT_TAUS:
        predicted = (base_val - tau * np.log(prior)).argmax(axis=1)
        scores.append(np.mean([np.mean(predicted[val.labels == c] == c) for c in np.unique(val.labels)]))
    assert adjusted.tau_ == DEFAULT_TAUS[int(np.argmax(np.round(scores, 6)))]
    expected = linear.decision_function(test.features) - adjusted.tau_ * np.log(prior)
    np.testing.assert_allclose(adjusted.decision_function(test.features), expected, rtol=1e-4, atol=1e-4)
    # No val: tau = 1, the adjustment that is Bayes-optimal for the balanced error.
    blind = create_head("posthoc_la").fit(train.features, train.labels, loss="ce", train=FAST)
    assert blind.tau_ == 1.0 and blind.tau_selected_on_ == "default"
    with pytest.raises(ConfigError, match="taus of posthoc_la"):
        _fit("posthoc_la", gaussian_feature_set, taus=[])


def test_posthoc_la_with_an_empty_class_stays_finite(gaussian_feature_set):
    """A class without training images counts as one (as in the losses): its
    log prior is finite, so no tau sends every image to it."""
    train, val, test = (gaussian_feature_set.splits[name] for name in ("train", "val", "test"))
    keep = train.labels != 19
    head = create_head("posthoc_la").fit(train.features[keep], train.labels[keep], X_val=val.features,
                                         y_val=val.labels, loss="ce", train=FAST, num_classes=20)
    assert np.isfinite(head.intercept_).all() and max(head.tau_scores_) > 0.3
    assert (head.predict(test.features) == test.labels).mean() > 0.3


def test_posthoc_la_lifts_few_shot_accuracy_over_its_cross_entropy_base(gaussian_feature_set):
    """The acceptance of issue 12 on the held-out Gaussian long-tailed data:
    at least 5 points of few-shot accuracy over CE on a linear head."""
    from decouple.stage_two.cells import Cell
    from decouple.stage_two.fit import fit_cells

    base, adjusted = fit_cells(gaussian_feature_set, [Cell("linear", "ce", "instance", 0),
                                                      Cell("posthoc_la", "ce", "instance", 0)])
    assert adjusted.metrics["test"]["few"] >= base.metrics["test"]["few"] + 0.05
    assert adjusted.metrics["test"]["mean_class_acc"] > base.metrics["test"]["mean_class_acc"]


def test_lws_learns_one_scale_per_class(gaussian_feature_set):
    head = _fit("lws", gaussian_feature_set)
    assert head.scales_.shape == (20,)
    assert not np.allclose(head.scales_, 1.0)


def test_ncm_is_nearest_normalised_class_mean(gaussian_feature_set):
    train, test = gaussian_feature_set.splits["train"], gaussian_feature_set.splits["test"]
    head = _fit("ncm", gaussian_feature_set)
    normalised = train.features / np.linalg.norm(train.features, axis=1, keepdims=True)
    means = np.stack([normalised[train.labels == c].mean(axis=0) for c in range(20)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    queries = test.features / np.linalg.norm(test.features, axis=1, keepdims=True)
    np.testing.assert_allclose(head.decision_function(test.features), queries @ means.T, atol=1e-5)
    l2 = _fit("ncm", gaussian_feature_set, metric="l2")
    assert (l2.predict(test.features) == test.labels).mean() > 0.6
    with pytest.raises(ConfigError, match="metric"):
        _fit("ncm", gaussian_feature_set, metric="manhattan")


def test_knn_votes_of_the_k_nearest(gaussian_feature_set):
    train, test = gaussian_feature_set.splits["train"], gaussian_feature_set.splits["test"]
    one = _fit("knn", gaussian_feature_set, k=1)
    normalised = train.features / np.linalg.norm(train.features, axis=1, keepdims=True)
    queries = test.features[:50] / np.linalg.norm(test.features[:50], axis=1, keepdims=True)
    nearest = train.labels[(queries @ normalised.T).argmax(axis=1)]
    np.testing.assert_array_equal(one.predict(test.features[:50]), nearest)
    scores = _fit("knn", gaussian_feature_set, k=7).decision_function(test.features)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)
    assert ((scores > 0).sum(axis=1) <= 7).all()
    with pytest.raises(ConfigError, match="k of knn"):
        _fit("knn", gaussian_feature_set, k=0)


def test_cosine_head_scores_are_scaled_cosines(gaussian_feature_set):
    head = _fit("cosine", gaussian_feature_set, scale=10.0)
    X = gaussian_feature_set.splits["test"].features
    scores = head.decision_function(X)
    assert np.abs(scores).max() <= 10.0 + 1e-4
    np.testing.assert_allclose(np.linalg.norm(head.coef_, axis=1), 1.0, rtol=1e-5)


def test_disalign_logits_are_the_papers_alignment_of_the_frozen_logits():
    """Zhang et al. 2021, eq. 4: (1 + s(x) alpha) * z + s(x) beta with
    s(x) = sigmoid(v.x + b_v), on a head set by hand; x the standardised
    feature. Worked by hand: x = (2, 3, 0) gives z = (2, 4), s = 1/2 and
    (4, 2); x = (1, 1, ln 3) gives z = (1, 2), s = 3/4 and (3.25, 0.5)."""
    import torch

    head = create_head("disalign")
    head.mean_ = np.array([1.0, 1.0, 0.0], dtype=np.float32)
    head.scale_ = np.array([0.5, 1.0, 2.0], dtype=np.float32)
    head.weight_ = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=np.float32)
    head.bias_ = np.array([0.0, 1.0], dtype=np.float32)
    head.confidence_weight_ = np.array([0.0, 0.0, 1.0], dtype=np.float32)
    head.confidence_bias_ = 0.0
    head.alpha_ = np.array([1.0, -1.0], dtype=np.float32)
    head.beta_ = np.array([2.0, 0.0], dtype=np.float32)
    standardized = np.array([[2.0, 3.0, 0.0], [1.0, 1.0, np.log(3.0)]])
    X = (standardized / head.scale_ + head.mean_).astype(np.float32)
    np.testing.assert_allclose(head.decision_function(X), [[4.0, 2.0], [3.25, 0.5]], rtol=1e-5)
    np.testing.assert_allclose(head.confidence(X), [0.5, 0.75], rtol=1e-6)
    np.testing.assert_allclose(head.scorer()(torch.from_numpy(X)).numpy(), [[4.0, 2.0], [3.25, 0.5]], rtol=1e-5)


def test_disalign_generalized_reweighting_is_the_papers_weighted_cross_entropy():
    """GRW (Zhang et al. 2021, Sec. 3.3): w_c = (1 / r_c)**rho / sum_k (1 / r_k)**rho * C
    with r_c = n_c / N, and torch's weighted-mean reduction of the authors' code."""
    import torch
    import torch.nn.functional as F

    from decouple.stage_two.losses import GeneralizedReweightLoss

    counts = np.array([8.0, 4.0, 2.0, 1.0])
    for rho in (0.0, 0.5, 1.2, 2.0):
        ratio = counts / counts.sum()
        expected = (1.0 / ratio) ** rho / np.sum((1.0 / ratio) ** rho) * len(counts)
        loss = GeneralizedReweightLoss(counts, power=rho)
        np.testing.assert_allclose(loss.class_weights.numpy(), expected, rtol=1e-6)
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.0, 1.0, 0.0, 0.0], [0.3, 0.2, 0.1, 3.0]], dtype=torch.float64)
    target = torch.tensor([0, 1, 3])
    weights = torch.as_tensor(expected)[target]  # rho = 2.0
    per_image = -torch.log_softmax(logits, dim=1)[torch.arange(3), target]
    np.testing.assert_allclose(loss(logits, target).item(), ((weights * per_image).sum() / weights.sum()).item(),
                               rtol=1e-12)
    assert loss(logits, target).item() == pytest.approx(F.cross_entropy(logits, target, weight=weights.new_tensor(
        expected)).item(), rel=1e-12)


def test_disalign_lifts_few_shot_accuracy_over_its_cross_entropy_base(gaussian_feature_set):
    """DisAlign on the linear head that ce / instance trained (one fused
    pass): at least 5 points of few-shot accuracy, without giving up the
    head classes (many-shot within 10 points) or any class altogether."""
    from decouple.stage_two.cells import Cell
    from decouple.stage_two.fit import fit_cells

    base, aligned = fit_cells(gaussian_feature_set, [Cell("linear", "ce", "instance", 0),
                                                     Cell("disalign", "ce", "instance", 0)], keep_heads=True)
    assert aligned.metrics["test"]["few"] >= base.metrics["test"]["few"] + 0.05
    assert aligned.metrics["test"]["mean_class_acc"] > base.metrics["test"]["mean_class_acc"]
    assert aligned.metrics["test"]["many"] >= base.metrics["test"]["many"] - 0.10
    assert min(aligned.metrics["test"]["per_class"]) > 0.0
    assert aligned.params["epoch"] == base.params["epoch"]  # the same linear weights
    assert aligned.params["selected_on"] == "val" and 1 <= aligned.params["align_epoch"]
    head = aligned.fitted_head
    assert head.align_history_ and head.align_epoch_ <= aligned.params["train"]["epochs"]
    assert np.all(np.isfinite(head.alpha_)) and np.all(np.isfinite(head.beta_))
    assert 0.0 < head.confidence(gaussian_feature_set.splits["test"].features).mean() < 1.0


def test_disalign_same_seed_same_numbers_and_its_epoch_is_chosen_on_val(gaussian_feature_set):
    train, val, test = (gaussian_feature_set.splits[name] for name in ("train", "val", "test"))
    first, second = (_fit("disalign", gaussian_feature_set) for _ in range(2))
    np.testing.assert_array_equal(first.decision_function(test.features), second.decision_function(test.features))
    assert first.selection_() == second.selection_()
    other = create_head("disalign").fit(train.features, train.labels, X_val=val.features, y_val=val.labels,
                                        loss="balanced_softmax", seed=1, train=FAST)
    assert not np.array_equal(other.decision_function(test.features), first.decision_function(test.features))
    # Without val the alignment keeps its last epoch, and says so.
    blind = create_head("disalign", epochs=3).fit(train.features, train.labels, loss="ce", train=FAST)
    assert blind.align_epoch_ == 3 and blind.align_history_ == [] and blind.selected_on_ == "last_epoch"


@pytest.mark.parametrize("params, name", [
    ({"rho": -0.5}, "rho"), ({"rho": float("nan")}, "rho"), ({"rho": "high"}, "rho"), ({"rho": True}, "rho"),
    ({"epochs": 0}, "epochs"), ({"epochs": 2.5}, "epochs"),
])
def test_disalign_bad_parameters_name_themselves(gaussian_feature_set, params, name):
    from decouple.stage_two.cells import Cell
    from decouple.stage_two.fit import fit_cells

    with pytest.raises(ConfigError, match=f"head parameter {name} of disalign"):
        _fit("disalign", gaussian_feature_set, **params)
    # A sweep refuses it before any training.
    with pytest.raises(ConfigError, match=f"head parameter {name} of disalign"):
        fit_cells(gaussian_feature_set, [Cell("disalign", "ce", params={"disalign": params})])


def test_ncm_scores_five_thousand_classes_on_the_cpu():
    """Issue 13: nearest class mean is a matrix product over all C means, so
    it has no k limit (a FAISS GPU search caps k at 2048). 5,000 classes,
    two training images each: the scores equal the cosine to every mean and
    each test image goes to its own class."""
    rng = np.random.default_rng(0)
    num_classes, dim = 5000, 48
    means = rng.standard_normal((num_classes, dim)).astype(np.float32) * 3
    y = np.repeat(np.arange(num_classes), 2)
    X = means[y] + rng.standard_normal((len(y), dim)).astype(np.float32) * 0.3
    queries = means[::7] + rng.standard_normal((len(means[::7]), dim)).astype(np.float32) * 0.3
    head = create_head("ncm").fit(X, y)
    scores = head.decision_function(queries)
    normalised = X / np.linalg.norm(X, axis=1, keepdims=True)
    class_means = normalised.reshape(num_classes, 2, dim).mean(axis=1)
    class_means /= np.linalg.norm(class_means, axis=1, keepdims=True)
    expected = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ class_means.T
    assert scores.shape == (len(queries), num_classes)
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    np.testing.assert_array_equal(scores.argmax(axis=1), np.arange(0, num_classes, 7))
