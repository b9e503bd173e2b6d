"""Tests of decouple.stage_two.losses: each loss against its paper's formula, computed here
independently with explicit numpy, plus properties every registered loss must have."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from decouple.errors import ConfigError, DataError, UnknownNameError
from decouple.stage_two.losses import LOSSES, LongTailLoss, create_loss, list_losses

DESIGN_NAMES = [
    "ce", "weighted_ce", "focal", "class_balanced", "balanced_softmax", "ldam",
    "equalization", "logit_adjusted",
]

# A small case: 4 samples, 3 classes, counts 50 / 8 / 2.
LOGITS = np.array([[2.0, 1.0, -1.0], [0.5, 0.3, 0.2], [-1.0, 3.0, 0.0], [1.0, 1.0, 1.0]])
TARGET = np.array([0, 2, 1, 2])
COUNTS = np.array([50.0, 8.0, 2.0])


def _loss_value(name: str, counts, logits=LOGITS, target=TARGET, **params) -> float:
    loss = create_loss(name, class_counts=counts, **params)
    return float(loss(torch.tensor(logits, dtype=torch.float64), torch.tensor(target)))


# ---------------------------------------------------------------------------
# Reference formulas, written out with numpy (not the implementation).
# ---------------------------------------------------------------------------


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def np_nll(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-sample -log softmax(z)[y]."""
    return -np_log_softmax(z)[np.arange(len(y)), y]


def np_effective_number(n: np.ndarray, beta: float) -> np.ndarray:
    return (1.0 - beta**n) / (1.0 - beta)


def np_cb_weights(n: np.ndarray, beta: float) -> np.ndarray:
    w = 1.0 / np_effective_number(n, beta)
    return w / w.sum() * len(n)


def ref_ce(z, y, n):
    return np_nll(z, y).mean()


def ref_weighted_ce(z, y, n, power=1.0):
    w = n ** (-power)
    w = w / w.mean()
    return (w[y] * np_nll(z, y)).sum() / len(y)


def ref_focal(z, y, n, gamma=2.0):
    p = np.exp(-np_nll(z, y))
    return (-((1 - p) ** gamma) * np.log(p)).mean()


def ref_class_balanced(z, y, n, beta=0.9999, base="softmax", gamma=1.0):
    w = np_cb_weights(n, beta)
    p = np.exp(-np_nll(z, y))
    per_sample = -np.log(p) if base == "softmax" else -((1 - p) ** gamma) * np.log(p)
    return (w[y] * per_sample).sum() / len(y)


def ref_balanced_softmax(z, y, n):
    # -log( n_y e^{z_y} / sum_k n_k e^{z_k} )
    num = n[y] * np.exp(z[np.arange(len(y)), y])
    den = (n[None, :] * np.exp(z)).sum(axis=1)
    return (-np.log(num / den)).mean()


def ref_ldam(z, y, n, max_margin=0.5, s=30.0, drw_weights=None):
    m = n ** -0.25
    m = m * max_margin / m.max()
    adjusted = z.copy()
    adjusted[np.arange(len(y)), y] -= m[y]
    per_sample = np_nll(s * adjusted, y)
    w = np.ones(len(n)) if drw_weights is None else drw_weights
    return (w[y] * per_sample).sum() / w[y].sum()


def ref_equalization_all_dropped(z, y, n, lambda_):
    """SEQL with gamma = 1 (beta always 1): every tail negative is suppressed."""
    f = n / n.sum()
    tail = f < lambda_
    losses = []
    for i in range(len(y)):
        keep = ~tail.copy()
        keep[y[i]] = True
        losses.append(-(z[i, y[i]] - np.log(np.exp(z[i, keep]).sum())))
    return np.mean(losses)


def ref_equalization(z, y, n, gamma=1.0, lambda_=None):
    assert gamma == 1.0, "with gamma < 1 the dropped classes are random"
    return ref_equalization_all_dropped(z, y, n, 1 / len(n) if lambda_ is None else lambda_)


def ref_logit_adjusted(z, y, n, tau=1.0):
    return np_nll(z + tau * np.log(n / n.sum()), y).mean()


def ref_label_aware_smoothing(z, y, n, smooth_head=0.3, smooth_tail=0.0, shape="concave"):
    """MiSLAS (Zhong et al. 2021), eq. 6 and the loss of the authors' methods.py."""
    r = (n - n.min()) / (n.max() - n.min())
    eps = {
        "concave": smooth_tail + (smooth_head - smooth_tail) * np.sin(np.pi / 2 * r),
        "linear": smooth_tail + (smooth_head - smooth_tail) * r,
        "convex": smooth_head + (smooth_head - smooth_tail) * np.sin(1.5 * np.pi + np.pi / 2 * r),
    }[shape][y]
    log_p = np_log_softmax(z)
    return ((1 - eps) * -log_p[np.arange(len(y)), y] + eps * -log_p.mean(axis=1)).mean()


# Every registered loss needs at least one case here: the paper's formula.
FORMULA_CASES = [
    ("ce", {}, ref_ce),
    ("weighted_ce", {}, ref_weighted_ce),
    ("weighted_ce", {"power": 0.5}, ref_weighted_ce),
    ("focal", {}, ref_focal),
    ("focal", {"gamma": 0.5}, ref_focal),
    ("class_balanced", {}, ref_class_balanced),
    ("class_balanced", {"beta": 0.9}, ref_class_balanced),
    ("class_balanced", {"base": "focal"}, ref_class_balanced),
    ("class_balanced", {"base": "focal", "gamma": 2.0, "beta": 0.99}, ref_class_balanced),
    ("balanced_softmax", {}, ref_balanced_softmax),
    ("ldam", {}, ref_ldam),
    ("ldam", {"max_margin": 0.3, "s": 4.0}, ref_ldam),
    ("equalization", {"gamma": 1.0, "lambda_": 0.1}, ref_equalization),
    ("equalization", {"gamma": 1.0}, ref_equalization),  # default lambda: 1 / C
    ("logit_adjusted", {}, ref_logit_adjusted),
    ("logit_adjusted", {"tau": 0.5}, ref_logit_adjusted),
    ("label_aware_smoothing", {}, ref_label_aware_smoothing),
    ("label_aware_smoothing", {"smooth_head": 0.4, "smooth_tail": 0.1, "shape": "linear"},
     ref_label_aware_smoothing),
    ("label_aware_smoothing", {"smooth_head": 0.4, "smooth_tail": 0.1, "shape": "convex"},
     ref_label_aware_smoothing),
]


def test_design_names_are_registered():
    assert set(DESIGN_NAMES) <= set(LOSSES)


def test_every_registered_loss_has_a_formula_case():
    covered = {name for name, _, _ in FORMULA_CASES}
    assert set(LOSSES) <= covered, f"add a formula case for {sorted(set(LOSSES) - covered)}"


@pytest.mark.parametrize("name,params,reference", FORMULA_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in FORMULA_CASES])
def test_matches_paper_formula(name, params, reference):
    expected = reference(LOGITS, TARGET, COUNTS, **params)
    # Buffers are float32, so agreement is to float32 precision.
    assert _loss_value(name, COUNTS, **params) == pytest.approx(expected, rel=1e-6)


# Cases small enough to work out on paper: two or three classes, zero logits.
def test_hand_computed_values():
    zeros2 = np.zeros((2, 2))
    # weighted_ce: counts 3/1 -> w ~ (1/3, 1), mean 1 -> (0.5, 1.5); both targets class 1.
    assert _loss_value("weighted_ce", [3, 1], zeros2, [1, 1]) == pytest.approx(1.5 * math.log(2))
    # focal: p_t = 1/2 -> (1/2)^2 log 2.
    assert _loss_value("focal", [3, 1], zeros2, [0, 1]) == pytest.approx(0.25 * math.log(2))
    # class_balanced, beta = 1/2, counts 1/2: E = (1, 1.5), w ~ (1, 2/3) summing to 2 -> (1.2, 0.8).
    assert _loss_value("class_balanced", [1, 2], zeros2, [0, 0], beta=0.5) == pytest.approx(
        1.2 * math.log(2), rel=1e-6)
    # balanced_softmax, counts 3/1, target 1: -log(1 / (3 + 1)) = log 4.
    assert _loss_value("balanced_softmax", [3, 1], zeros2, [1, 1]) == pytest.approx(math.log(4), rel=1e-6)
    # logit_adjusted, tau = 2: prior (3/4, 1/4) -> -log((1/16) / (9/16 + 1/16)) = log 10.
    assert _loss_value("logit_adjusted", [3, 1], zeros2, [1, 1], tau=2.0) == pytest.approx(
        math.log(10), rel=1e-6)
    # ldam, counts 16/1: n^-1/4 = (1/2, 1) -> margins (0.25, 0.5); s = 2, target 1:
    # -log(e^{-1} / (1 + e^{-1})) = log(1 + e).
    assert _loss_value("ldam", [16, 1], zeros2, [1, 1], s=2.0) == pytest.approx(
        math.log(1 + math.e), rel=1e-6)
    # equalization, gamma = 1, frequencies (0.9, 0.09, 0.01), lambda 1/3: classes 1 and 2 are tail.
    zeros3 = np.zeros((1, 3))
    assert _loss_value("equalization", [90, 9, 1], zeros3, [0], gamma=1.0) == pytest.approx(0.0, abs=1e-12)
    assert _loss_value("equalization", [90, 9, 1], zeros3, [1], gamma=1.0) == pytest.approx(math.log(2))


# ---------------------------------------------------------------------------
# Reductions to cross-entropy, where each paper says so.
# ---------------------------------------------------------------------------

EQUAL = np.array([7.0, 7.0, 7.0])
CE_REDUCTIONS = [
    ("ce", COUNTS, {}),
    ("weighted_ce", EQUAL, {}),
    ("weighted_ce", COUNTS, {"power": 0.0}),
    ("focal", COUNTS, {"gamma": 0.0}),
    ("class_balanced", EQUAL, {}),
    ("class_balanced", COUNTS, {"beta": 0.0}),
    ("class_balanced", EQUAL, {"base": "focal", "gamma": 0.0}),
    ("balanced_softmax", EQUAL, {}),
    ("logit_adjusted", EQUAL, {}),
    ("logit_adjusted", COUNTS, {"tau": 0.0}),
    ("ldam", COUNTS, {"max_margin": 0.0, "s": 1.0}),
    ("equalization", COUNTS, {"gamma": 0.0}),
    ("equalization", EQUAL, {}),  # no class is rarer than uniform, so nothing is suppressed
]


@pytest.mark.parametrize("name,counts,params", CE_REDUCTIONS,
                         ids=[f"{c[0]}-{c[2]}" for c in CE_REDUCTIONS])
def test_reduces_to_cross_entropy(name, counts, params):
    logits = torch.tensor(LOGITS)
    expected = float(F.cross_entropy(logits, torch.tensor(TARGET)))
    assert _loss_value(name, counts, **params) == pytest.approx(expected, rel=1e-6)


def test_label_aware_smoothing_factors_run_from_head_to_tail_by_shape_and_preset():
    """eps_1 for the most frequent class, eps_K for the rarest; concave above
    linear above convex in between (eq. 6); the authors' per-dataset configs;
    equal counts give every class eps_1."""
    from decouple.stage_two.losses import LABEL_SMOOTHING_PRESETS, label_aware_smoothing_factors

    counts = np.array([5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50])
    shapes = {shape: label_aware_smoothing_factors(counts, 0.4, 0.1, shape) for shape in ("concave", "linear", "convex")}
    for factors in shapes.values():
        assert factors[0] == pytest.approx(0.4) and factors[-1] == pytest.approx(0.1)
    assert np.all(shapes["concave"][1:-1] > shapes["linear"][1:-1])
    assert np.all(shapes["linear"][1:-1] > shapes["convex"][1:-1])
    assert np.all(label_aware_smoothing_factors([7, 7, 7], 0.3, 0.0) == 0.3)
    assert LABEL_SMOOTHING_PRESETS["cifar100_if100"] == (0.4, 0.1)
    loss = create_loss("label_aware_smoothing", class_counts=counts, preset="cifar100_if100")
    assert (loss.smooth_head, loss.smooth_tail) == (0.4, 0.1)
    assert create_loss("label_aware_smoothing", class_counts=counts, preset="cifar100_if100",
                       smooth_tail=0.0).smooth_tail == 0.0
    with pytest.raises(ConfigError, match="shape must be one of concave, linear, convex"):
        create_loss("label_aware_smoothing", class_counts=counts, shape="exp")
    with pytest.raises(ConfigError, match="preset must be one of"):
        create_loss("label_aware_smoothing", class_counts=counts, preset="cifar10")
    with pytest.raises(ConfigError, match=r"smooth_head must lie in \[0, 1\)"):
        create_loss("label_aware_smoothing", class_counts=counts, smooth_head=1.0)


def test_label_aware_smoothing_with_cb_sampling_lifts_few_shot_and_calibrates(gaussian_feature_set):
    """Issue 12's acceptance on the Gaussian long-tailed data, with the
    authors' second stage (class-balanced sampling): few-shot accuracy at
    least 5 points over CE on a linear head, and a lower uncalibrated ECE."""
    from decouple.stage_two.cells import Cell
    from decouple.stage_two.fit import fit_cells

    base, smoothed = fit_cells(gaussian_feature_set, [Cell("linear", "ce", "instance", 0),
                                                      Cell("linear", "label_aware_smoothing", "class_balanced", 0)])
    assert smoothed.metrics["test"]["few"] >= base.metrics["test"]["few"] + 0.05
    assert smoothed.metrics["test"]["ece_raw"] < base.metrics["test"]["ece_raw"]


def test_logit_adjusted_with_tau_one_is_balanced_softmax():
    assert _loss_value("logit_adjusted", COUNTS) == pytest.approx(_loss_value("balanced_softmax", COUNTS))


# ---------------------------------------------------------------------------
# Properties of every registered loss.
# ---------------------------------------------------------------------------

EXTREME_COUNTS = np.array([10_000, 1, 5_000, 1, 300, 10_000])


@pytest.fixture(params=sorted(LOSSES))
def name(request):
    return request.param


@pytest.mark.parametrize("scale", [1.0, 1e3, 1e6])
def test_finite_values_and_gradients_for_extreme_counts_and_logits(name, scale):
    torch.manual_seed(0)
    loss = create_loss(name, class_counts=EXTREME_COUNTS)
    loss.set_epoch(9, 10)  # LDAM: deferred re-weighting on
    logits = (torch.randn(64, 6) * scale).requires_grad_()
    target = torch.arange(64) % 6
    value = loss(logits, target)
    value.backward()
    assert value.dim() == 0 and torch.isfinite(value)
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize(
    "name_params", [("focal", {"gamma": 0.5}), ("class_balanced", {"base": "focal", "gamma": 0.5})],
    ids=["focal", "class_balanced-focal"],
)
def test_focal_gamma_below_one_has_finite_gradient_when_confident(name_params):
    # (1 - p_t)^(gamma - 1) is infinite at p_t = 1; the gradient must not be NaN.
    loss_name, params = name_params
    loss = create_loss(loss_name, class_counts=[5, 1], **params)
    logits = torch.tensor([[200.0, -200.0], [0.0, 0.0]], requires_grad=True)
    value = loss(logits, torch.tensor([0, 1]))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()


def test_class_balanced_weights_are_sane_for_tiny_and_huge_counts():
    # beta = 0.9999: E_1 = 1 and E_10000 = (1 - 0.9999^10000) / 1e-4 ~ 6321; weights sum to C.
    loss = create_loss("class_balanced", class_counts=[10_000, 1])
    weights = loss.class_weights.double().numpy()
    expected = np.array([1 / ((1 - 0.9999**10_000) / 1e-4), 1.0])
    expected = expected / expected.sum() * 2
    np.testing.assert_allclose(weights, expected, rtol=1e-6)
    assert weights.sum() == pytest.approx(2.0)


def test_zero_count_classes_stay_finite(name):
    loss = create_loss(name, class_counts=[100, 0, 5])
    logits = torch.randn(8, 3, requires_grad=True)
    value = loss(logits, torch.tensor([0, 2] * 4))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()


def test_accepts_list_numpy_and_tensor_counts(name):
    params = {"gamma": 1.0} if name == "equalization" else {}  # gamma = 1: no randomness
    from_list = _loss_value(name, [50, 8, 2], **params)
    for counts in (np.array([50, 8, 2]), torch.tensor([50, 8, 2])):
        assert _loss_value(name, counts, **params) == pytest.approx(from_list)


def test_class_counts_buffer_and_buffers_follow_to(name):
    loss = create_loss(name, class_counts=[4, 2, 1])
    assert isinstance(loss, LongTailLoss)
    assert loss.class_counts.dtype == torch.float32
    assert loss.class_counts.tolist() == [4.0, 2.0, 1.0]
    loss.to("meta")
    assert all(buffer.device.type == "meta" for buffer in loss.buffers())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda(name):
    loss = create_loss(name, class_counts=EXTREME_COUNTS).to("cuda")
    loss.set_epoch(9, 10)
    logits = torch.randn(32, 6, device="cuda", requires_grad=True)
    value = loss(logits, torch.arange(32, device="cuda") % 6)
    value.backward()
    assert value.device.type == "cuda" and torch.isfinite(value)


def test_half_precision_logits_are_computed_in_float32(name):
    torch.manual_seed(0)
    loss = create_loss(name, class_counts=EXTREME_COUNTS)
    logits = (torch.randn(16, 6) * 100).half()
    value = loss(logits, torch.arange(16) % 6)
    assert value.dtype == torch.float32 and torch.isfinite(value)


def test_set_epoch_is_accepted_and_only_ldam_changes(name):
    loss = create_loss(name, class_counts=COUNTS, **({"gamma": 1.0} if name == "equalization" else {}))
    before = _loss_with(loss)
    loss.set_epoch(0, 10)
    assert _loss_with(loss) == pytest.approx(before)
    loss.set_epoch(9, 10)
    if name != "ldam":
        assert _loss_with(loss) == pytest.approx(before)


def _loss_with(loss) -> float:
    return float(loss(torch.tensor(LOGITS), torch.tensor(TARGET)))


def test_description_is_one_line_and_params_have_defaults(name):
    descriptions = dict(list_losses())
    assert descriptions[name] and "\n" not in descriptions[name]
    params = LOSSES.parameters(name)
    assert "class_counts" in params
    defaults = {key: value for key, value in params.items() if key != "class_counts"}
    # What the sweep introspects must build the loss unchanged.
    create_loss(name, class_counts=COUNTS, **defaults)


def test_shape_mismatch_is_a_clear_error(name):
    loss = create_loss(name, class_counts=COUNTS)
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        loss(torch.zeros(2, 4), torch.tensor([0, 1]))


def test_training_a_linear_head_does_not_collapse(name):
    # The study this tool grew from saw a class-balanced loss fall to chance.
    # Fit a linear head on long-tailed Gaussian classes (counts 400 .. 3) and
    # require a balanced test accuracy far above chance (0.2); ce reaches ~0.77.
    rng = np.random.default_rng(0)
    counts = np.array([400, 100, 30, 10, 3])
    means = rng.normal(size=(5, 8)) * 2.0
    train_labels = np.repeat(np.arange(5), counts)
    test_labels = np.repeat(np.arange(5), 200)
    features = torch.tensor(means[train_labels] + rng.normal(size=(len(train_labels), 8))).float()
    test_features = torch.tensor(means[test_labels] + rng.normal(size=(1000, 8))).float()
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 5)
    loss = create_loss(name, class_counts=counts)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    steps = 60
    for step in range(steps):
        loss.set_epoch(step, steps)
        optimizer.zero_grad()
        loss(head(features), torch.as_tensor(train_labels)).backward()
        optimizer.step()
    with torch.no_grad():
        predictions = head(test_features).argmax(dim=1).numpy()
    balanced_accuracy = np.mean([np.mean(predictions[test_labels == c] == c) for c in range(5)])
    assert balanced_accuracy > 0.6


# ---------------------------------------------------------------------------
# LDAM's deferred re-weighting and equalization's randomness.
# ---------------------------------------------------------------------------


def test_ldam_drw_switches_on_at_drw_epoch():
    loss = create_loss("ldam", class_counts=COUNTS, drw_epoch=3)
    logits, target = torch.tensor(LOGITS), torch.tensor(TARGET)
    plain = ref_ldam(LOGITS, TARGET, COUNTS)
    reweighted = ref_ldam(LOGITS, TARGET, COUNTS, drw_weights=np_cb_weights(COUNTS, 0.9999))
    assert plain != pytest.approx(reweighted)
    assert float(loss(logits, target)) == pytest.approx(plain)  # before any set_epoch
    for epoch in range(6):
        loss.set_epoch(epoch, 6)
        expected = reweighted if epoch >= 3 else plain
        assert float(loss(logits, target)) == pytest.approx(expected, rel=1e-6), epoch
    loss.set_epoch(0, 6)
    assert float(loss(logits, target)) == pytest.approx(plain)


def test_ldam_default_drw_epoch_is_80_percent():
    loss = create_loss("ldam", class_counts=COUNTS)
    assert loss.drw_start(200) == 160
    loss.set_epoch(159, 200)
    assert not loss.drw_active
    loss.set_epoch(160, 200)
    assert loss.drw_active


def test_ldam_defers_to_80_percent_end_to_end_and_to_half_the_run_on_fixed_features():
    from decouple.stage_two.losses import family_settings

    assert family_settings("ldam", "linear") == {"s": 1.0}  # stage one: the paper's 80%
    assert family_settings("ldam", "cosine", fixed_features=True) == {"drw_fraction": 0.5}
    assert family_settings("ldam", "linear", {"drw_fraction": 0.8}, fixed_features=True) == {
        "s": 1.0, "drw_fraction": 0.8}
    assert family_settings("focal", "cosine", fixed_features=True) == {}


def test_ldam_drw_fraction_moves_the_default_start():
    loss = create_loss("ldam", class_counts=COUNTS, drw_fraction=0.5)
    assert loss.drw_start(200) == 100 and loss.drw_start(37) == 18
    assert create_loss("ldam", class_counts=COUNTS, drw_fraction=0.5, drw_epoch=7).drw_start(200) == 7
    with pytest.raises(ConfigError, match="drw_fraction"):
        create_loss("ldam", class_counts=COUNTS, drw_fraction=1.5)


def test_a_reseeded_equalization_loss_draws_from_its_own_generator():
    loss = create_loss("equalization", class_counts=[100, 1], gamma=0.5)
    logits = torch.tensor([[0.0, 1.0]]).expand(1000, 2)
    target = torch.zeros(1000, dtype=torch.long)
    loss.reseed(7)
    first = float(loss(logits, target))
    torch.manual_seed(123)  # the global generator no longer matters
    torch.rand(10)
    loss.reseed(7)
    assert float(loss(logits, target)) == first
    loss.reseed(8)
    assert float(loss(logits, target)) != first


def test_equalization_is_reproducible_and_drops_with_probability_gamma():
    # One tail class (frequency 1/101 < 1/2) and identical rows: each row's loss is
    # either the full softmax or the one without class 1, so the batch mean reveals
    # the fraction of rows where class 1 was dropped.
    loss = create_loss("equalization", class_counts=[100, 1], gamma=0.3)
    rows = 20_000
    logits = torch.tensor([[0.0, 1.0]]).expand(rows, 2)
    target = torch.zeros(rows, dtype=torch.long)
    torch.manual_seed(1)
    first = float(loss(logits, target))
    torch.manual_seed(1)
    assert float(loss(logits, target)) == first
    full, dropped = math.log(1 + math.e), 0.0
    fraction = (full - first) / (full - dropped)
    # Binomial standard error sqrt(0.3 * 0.7 / 20000) ~ 0.0032; allow 5 of them.
    assert fraction == pytest.approx(0.3, abs=0.017)


# ---------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------


def test_unknown_name_lists_known_losses():
    with pytest.raises(UnknownNameError) as info:
        create_loss("balanced_softmx", class_counts=COUNTS)
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message
    assert "balanced_softmax" in message
    for known in LOSSES:
        assert known in message


def test_unknown_param_is_named():
    with pytest.raises(ConfigError, match="gama"):
        create_loss("focal", class_counts=COUNTS, gama=2.0)


@pytest.mark.parametrize(
    "name,params,fragment",
    [
        ("class_balanced", {"beta": 1.0}, "beta"),
        ("class_balanced", {"base": "sigmoid"}, "base"),
        ("focal", {"gamma": -1.0}, "gamma"),
        ("focal", {"alpha": [1.0, 2.0]}, "alpha"),
        ("ldam", {"s": 0.0}, "s must"),
        ("ldam", {"drw_epoch": 2.5}, "drw_epoch"),
        ("equalization", {"gamma": 1.5}, "gamma"),
        ("weighted_ce", {"power": float("nan")}, "power"),
    ],
)
def test_bad_param_values_are_config_errors(name, params, fragment):
    with pytest.raises(ConfigError, match=fragment):
        create_loss(name, class_counts=COUNTS, **params)


@pytest.mark.parametrize("counts", [[], [[1, 2]], [1, -1], [0, 0], [1, float("nan")]])
def test_bad_counts_are_data_errors(counts):
    with pytest.raises(DataError, match="class_counts"):
        create_loss("ce", class_counts=counts)
