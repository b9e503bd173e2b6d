"""Long-tailed classification losses (a registry).

Every loss is a small :class:`LongTailLoss` module built from the training
class counts: ``loss = create_loss("balanced_softmax", class_counts=counts)``,
then ``loss(logits, target)`` with ``logits`` (B, C) and ``target`` (B,)
int64 gives the scalar mean loss over the batch. Hyperparameters are plain
keyword arguments with the papers' defaults, so a sweep config
``params: {focal: {gamma: 2.0}}`` reaches them and
``LOSSES.parameters(name)`` lists them.

Conventions shared by every loss here:

* Per-class quantities (weights, priors, margins) are computed once, in
  float64 numpy, at construction and kept as buffers, so they follow
  ``.to(device)`` and ``forward`` runs on any device without numpy.
* ``forward`` computes in at least float32, whatever the logits' dtype.
* A class with no training images (count 0) is treated as having one image
  wherever a count is divided by, inverted or logged (weights, priors,
  margins), so every value stays finite. Such a class never occurs as a
  target in training, so this only fixes how it competes as a negative.
* Re-weighted losses follow their paper's reduction; each says which.

The formulas follow the survey of Zhang et al., "Deep Long-Tailed Learning:
A Survey" (TPAMI 2023) and the cited papers.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from decouple.errors import ClassCountError, ConfigError, DataError
from decouple.registry import Registry

LOSSES = Registry("loss")
register_loss = LOSSES.register

#: How a classifier computes its logits, which decides some losses' settings
#: (``family_defaults``): "linear", W x + b; "cosine", cos(x, w) in [-1, 1].
#: Each head class names its ``logit_family``; stage one's network is linear.
LOGIT_FAMILIES = ("linear", "cosine")
#: Stage one's classifier, listed with the heads of its family.
STAGE_ONE = "stage one"

CountsLike = Union[np.ndarray, Sequence[float], Tensor]


# ---------------------------------------------------------------------------
# Pure helpers: counts in, per-class arrays out (float64 numpy).
# ---------------------------------------------------------------------------


def as_class_counts(class_counts: CountsLike) -> np.ndarray:
    """Validate per-class training counts and return them as float64 (C,).

    Counts must be one-dimensional, finite and non-negative, with at least
    one positive entry.
    """
    if isinstance(class_counts, Tensor):
        class_counts = class_counts.detach().cpu().numpy()
    try:
        counts = np.asarray(class_counts, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"class_counts must be numbers; got {type(class_counts).__name__}") from exc
    if counts.ndim != 1 or counts.size == 0:
        raise DataError(
            f"class_counts must be a non-empty 1-D array (C,); got shape {counts.shape}"
        )
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise DataError("class_counts must be finite and non-negative; got " + _preview(counts))
    if not np.any(counts > 0):
        raise DataError("class_counts must have at least one positive count; got all zeros")
    return counts


def _preview(values: np.ndarray, limit: int = 6) -> str:
    shown = ", ".join(f"{v:g}" for v in values[:limit])
    return f"[{shown}{', ...' if values.size > limit else ''}]"


def _floored(counts: np.ndarray) -> np.ndarray:
    # A class with no images is treated as a one-image class (module docstring).
    return np.maximum(counts, 1.0)


def log_prior(class_counts: CountsLike) -> np.ndarray:
    """log pi_c = log(n_c / N), (C,), with empty classes counted as one image."""
    counts = _floored(as_class_counts(class_counts))
    return np.log(counts) - np.log(counts.sum())


def inverse_frequency_weights(class_counts: CountsLike, power: float = 1.0) -> np.ndarray:
    """w_c proportional to 1 / n_c**power, normalised to mean 1 over classes, (C,)."""
    counts = _floored(as_class_counts(class_counts))
    # Divide by the smallest count first so large powers cannot overflow.
    weights = (counts.min() / counts) ** power
    return weights / weights.mean()


def effective_number(class_counts: CountsLike, beta: float) -> np.ndarray:
    """Effective number of samples E_n = (1 - beta**n) / (1 - beta), (C,).

    Cui et al. (CVPR 2019). Computed as -expm1(n log beta) / (1 - beta)
    in float64: beta = 0.9999 is exactly 1 in float16 and 1 - beta**n loses
    most of its digits for small n in float32, the classic way this loss
    turns into a division by zero. beta = 0 gives E_n = 1 for n >= 1.
    """
    counts = as_class_counts(class_counts)
    if not 0.0 <= beta < 1.0:
        raise ConfigError(f"effective-number beta must lie in [0, 1); got {beta}")
    if beta == 0.0:
        return np.where(counts > 0, 1.0, 0.0)
    return -np.expm1(counts * np.log(beta)) / (1.0 - beta)


def class_balanced_weights(class_counts: CountsLike, beta: float = 0.9999) -> np.ndarray:
    """Cui et al.'s weights w_c proportional to 1 / E_{n_c}, normalised to sum to C, (C,).

    Empty classes are counted as one image (E_1 = 1, the largest weight), so
    no weight is infinite.
    """
    counts = _floored(as_class_counts(class_counts))
    weights = 1.0 / effective_number(counts, beta)
    return weights * (len(counts) / weights.sum())


def ldam_margins(class_counts: CountsLike, max_margin: float = 0.5) -> np.ndarray:
    """Cao et al.'s margins m_c = K / n_c**(1/4), K chosen so max_c m_c = max_margin, (C,)."""
    counts = _floored(as_class_counts(class_counts))
    margins = (counts.min() / counts) ** 0.25
    return max_margin * margins / margins.max()


def _buffer(values: np.ndarray) -> Tensor:
    return torch.as_tensor(values, dtype=torch.float32)


def _check_finite(name: str, value: float) -> float:
    value = float(value)
    if not np.isfinite(value):
        raise ConfigError(f"loss parameter {name} must be a finite number; got {value}")
    return value


def _check_at_least(name: str, value: float, low: float) -> float:
    value = _check_finite(name, value)
    if value < low:
        raise ConfigError(f"loss parameter {name} must be >= {low:g}; got {value:g}")
    return value


def _check_probability(name: str, value: float) -> float:
    value = _check_finite(name, value)
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"loss parameter {name} must lie in [0, 1]; got {value:g}")
    return value


def _compute_dtype(logits: Tensor) -> torch.dtype:
    # float16 / bfloat16 logits (autocast) are lifted; float64 is kept for exact tests.
    return torch.promote_types(logits.dtype, torch.float32)


def _focal_terms(log_pt: Tensor, gamma: float) -> Tensor:
    """-(1 - p_t)**gamma * log p_t for log-probabilities of the target, (B,).

    1 - p_t is formed as -expm1(log p_t) (exact when p_t is near 1) and
    floored at the smallest normal number, so (1 - p_t)**(gamma - 1) in the
    gradient stays finite for gamma < 1 and confident predictions.
    """
    if gamma == 0.0:
        return -log_pt
    one_minus_pt = (-torch.expm1(log_pt)).clamp(min=torch.finfo(log_pt.dtype).tiny)
    return -(one_minus_pt**gamma) * log_pt


# ---------------------------------------------------------------------------
# Base class, registry access.
# ---------------------------------------------------------------------------


class LongTailLoss(nn.Module):
    """Base of every long-tailed loss: holds the class counts as a float buffer.

    ``class_counts`` (C,): training images per class (numpy array, list or
    tensor). Subclasses implement ``forward(logits (B, C), target (B,)) ->
    scalar mean loss``.

    ``applies_own_scale``: True when the loss multiplies the logits by a
    scale of its own (LDAM's s, meant for raw cosines). A cosine head then
    hands it unscaled cosines instead of applying its own temperature.

    ``balances_prior``: True when the loss re-balances the classes, so that
    the head it trains assumes a uniform test prior whatever the sampler
    (:mod:`decouple.stage_two.priors`); False when the head learns the
    prior its sampler shows it (cross-entropy, focal, label smoothing).
    """

    applies_own_scale: bool = False
    balances_prior: bool = False
    #: Settings that differ by head family from the constructor's defaults,
    #: {family: {name: value}}; :func:`family_settings` applies them, and a
    #: value the user sets wins.
    family_defaults: Dict[str, Dict[str, Any]] = {}
    #: Settings for a head trained on fixed features (stage two) that differ
    #: from the end-to-end defaults of the constructor, {name: value}.
    head_defaults: Dict[str, Any] = {}

    def __init__(self, class_counts: CountsLike) -> None:
        super().__init__()
        counts = as_class_counts(class_counts)
        self.register_buffer("class_counts", _buffer(counts))
        self._counts_np = counts

    @property
    def num_classes(self) -> int:
        return int(self.class_counts.shape[0])

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        """Tell the loss which epoch (0-based) of ``total_epochs`` starts; no-op by default."""

    def reseed(self, seed: int) -> None:
        """Draw the loss's random numbers from a generator of its own seeded
        with ``seed`` (so a run does not depend on what else draws); no-op for
        a loss that draws none."""

    def _check_inputs(self, logits: Tensor, target: Tensor) -> None:
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"{type(self).__name__}: logits must have shape (B, {self.num_classes}); "
                f"got {tuple(logits.shape)}"
            )
        if target.shape != logits.shape[:1]:
            raise ValueError(
                f"{type(self).__name__}: target must have shape ({logits.shape[0]},); "
                f"got {tuple(target.shape)}"
            )

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}"


def family_settings(
    name: str, family: str, given: Optional[Dict[str, Any]] = None, *, fixed_features: bool = False
) -> Dict[str, Any]:
    """Settings of loss ``name`` on a head of logit family ``family``
    (LOGIT_FAMILIES): the family's defaults (``family_defaults``; none for a
    family no loss names), then, for a head trained on fixed features (stage
    two), the loss's ``head_defaults``, overridden by ``given``."""
    loss_class = LOSSES.get(name)
    settings = dict(getattr(loss_class, "family_defaults", {}).get(family, {}))
    if fixed_features:
        settings.update(getattr(loss_class, "head_defaults", {}))
    settings.update(given or {})
    return settings


def family_note(name: str, families: Mapping[str, Sequence[str]]) -> str:
    """"s=1 on linear, tau_norm, posthoc_la, lws and stage one; s=30 on cosine" for a loss
    whose settings differ by head family (the constructor default where a
    family sets none), ``families`` mapping each family to the classifiers
    in it; "" otherwise."""
    defaults = getattr(LOSSES.get(name), "family_defaults", {})
    keys = sorted({key for settings in defaults.values() for key in settings})
    if not keys:
        return ""
    constructor = LOSSES.parameters(name)
    parts = []
    for family, members in families.items():
        values = {**{key: constructor.get(key) for key in keys}, **defaults.get(family, {})}
        where = members[0] if len(members) == 1 else f"{', '.join(members[:-1])} and {members[-1]}"
        parts.append(", ".join(f"{key}={values[key]:g}" for key in keys) + f" on {where}")
    return "; ".join(parts)


def create_loss(name: str, *, class_counts: CountsLike, **params) -> LongTailLoss:
    """Build the loss registered as ``name`` for ``class_counts`` (C,).

    An unknown name raises UnknownNameError listing the known losses; an
    unknown keyword raises ConfigError naming it (both are ValueErrors).
    """
    return LOSSES.create(name, class_counts=class_counts, **params)


def list_losses(families: Optional[Mapping[str, Sequence[str]]] = None) -> List[Tuple[str, str]]:
    """(name, one-line description) of every registered loss, with the
    settings that differ by head family (:func:`family_note`; ``families``
    as :func:`decouple.stage_two.heads.head_families` gives them, by default
    each family by its name)."""
    if families is None:
        families = {family: (family,) for family in LOGIT_FAMILIES}
    listing = []
    for name, description in LOSSES.describe():
        note = family_note(name, families)
        listing.append((name, f"{description} ({note})" if note else description))
    return listing


# ---------------------------------------------------------------------------
# The losses.
# ---------------------------------------------------------------------------


@register_loss("ce")
class CrossEntropyLoss(LongTailLoss):
    """Plain softmax cross-entropy, the long-tail-unaware baseline.

    loss = mean_i -log softmax(z_i)[y_i].
    """

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self._check_inputs(logits, target)
        return F.cross_entropy(logits.to(_compute_dtype(logits)), target)


@register_loss("weighted_ce")
class WeightedCrossEntropyLoss(LongTailLoss):
    """Cross-entropy re-weighted by inverse class frequency, w_c ~ 1 / n_c**power.

    Classic re-weighting (class-sensitive learning in Zhang et al., "Deep
    Long-Tailed Learning: A Survey", TPAMI 2023): w_c = n_c**-power,
    normalised to mean 1 over the C classes; ``power`` = 1 is inverse
    frequency, 0.5 inverse square root, 0 plain cross-entropy.

    loss = (1 / B) sum_i w_{y_i} * (-log softmax(z_i)[y_i])

    The batch-size reduction (as in Cui et al.'s class-balanced loss) keeps
    the weights' effect across batches; torch's weighted mean (divide by
    sum_i w_{y_i}) would undo it within every batch of a single class.
    """

    balances_prior = True

    def __init__(self, class_counts: CountsLike, power: float = 1.0) -> None:
        super().__init__(class_counts)
        self.power = _check_at_least("power", power, 0.0)
        self.register_buffer(
            "class_weights", _buffer(inverse_frequency_weights(self._counts_np, self.power)),
            persistent=False,
        )

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self._check_inputs(logits, target)
        logits = logits.to(_compute_dtype(logits))
        per_sample = F.cross_entropy(logits, target, reduction="none")
        return (self.class_weights.to(logits.dtype)[target] * per_sample).mean()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, power={self.power:g}"


class GeneralizedReweightLoss(WeightedCrossEntropyLoss):
    """DisAlign's generalized re-weighting (GRW): cross-entropy with class
    weights w_c = (1 / r_c)**rho / sum_k (1 / r_k)**rho * C, r_c = n_c / N.

    Zhang et al., "Distribution Alignment: A Unified Framework for Long-tail
    Visual Recognition" (CVPR 2021), Sec. 3.3; the authors' code
    (cvpods ``GRWCrossEntropyLoss``). Those weights are
    :func:`inverse_frequency_weights` with ``power`` = rho (mean 1 is sum
    C, and (N / n_c)**rho is proportional to n_c**-rho). The reduction is
    the authors' (torch's weighted mean), not ``weighted_ce``'s batch mean:

    loss = sum_i w_{y_i} * (-log softmax(z_i)[y_i]) / sum_i w_{y_i}

    The two differ by the factor B / sum_i w_{y_i}, which changes from batch
    to batch, so weighted_ce is not GRW. Not registered: it is the loss of the
    ``disalign`` head's alignment stage (:class:`decouple.stage_two.heads.DisAlignHead`).
    """

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self._check_inputs(logits, target)
        logits = logits.to(_compute_dtype(logits))
        return F.cross_entropy(logits, target, weight=self.class_weights.to(logits.dtype))


@register_loss("focal")
class FocalLoss(LongTailLoss):
    """Focal loss: cross-entropy scaled by (1 - p_t)**gamma to focus on hard examples.

    Lin et al., "Focal Loss for Dense Object Detection" (ICCV 2017), softmax
    form: loss = (1 / B) sum_i -alpha_{y_i} (1 - p_t)**gamma log p_t, with
    p_t = softmax(z_i)[y_i]. ``gamma`` = 2 is the paper's default; gamma = 0
    is cross-entropy. ``alpha`` is off by default (alpha_c = 1); a number
    scales every term (with softmax there are no negative terms for the
    paper's binary alpha to balance against), a sequence of C numbers gives
    the per-class alpha-balanced variant.
    """

    def __init__(
        self,
        class_counts: CountsLike,
        gamma: float = 2.0,
        alpha: Optional[Union[float, Sequence[float]]] = None,
    ) -> None:
        super().__init__(class_counts)
        self.gamma = _check_at_least("gamma", gamma, 0.0)
        try:
            alpha_values = np.ones(self.num_classes) if alpha is None else np.asarray(alpha, float)
        except (TypeError, ValueError):
            raise ConfigError(f"loss parameter alpha must be a number or a list of numbers; got {alpha!r}") from None
        if alpha_values.ndim == 0:
            alpha_values = np.full(self.num_classes, float(alpha_values))
        if not np.all(np.isfinite(alpha_values)) or np.any(alpha_values < 0):
            raise ConfigError(
                f"loss parameter alpha must be a non-negative number or {self.num_classes} "
                f"non-negative numbers (one per class); got {alpha!r}"
            )
        if alpha_values.shape != (self.num_classes,):
            raise ClassCountError(
                f"loss parameter alpha must be one number or one per class, {self.num_classes} "
                f"numbers; got {alpha_values.size}"
            )
        self.register_buffer("alpha", _buffer(alpha_values), persistent=False)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self._check_inputs(logits, target)
        logits = logits.to(_compute_dtype(logits))
        log_pt = F.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
        return (self.alpha.to(logits.dtype)[target] * _focal_terms(log_pt, self.gamma)).mean()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, gamma={self.gamma:g}"


@register_loss("class_balanced")
class ClassBalancedLoss(LongTailLoss):
    """Class-balanced loss: re-weights by the inverse effective number of samples.

    Cui et al., "Class-Balanced Loss Based on Effective Number of Samples"
    (CVPR 2019). E_n = (1 - beta**n) / (1 - beta); w_c = (1 / E_{n_c})
    normalised so sum_c w_c = C; ``beta`` = 0.9999 by default.

    loss = (1 / B) sum_i w_{y_i} * l(z_i, y_i)

    i.e. divided by the batch size, as in the paper's reference
    implementation, not by sum_i w_{y_i} (torch's weighted mean).
    ``base`` chooses l: "softmax" (default), softmax cross-entropy
    -log p_t; "focal", the softmax focal loss -(1 - p_t)**gamma log p_t.
    ``gamma`` (focal base only) defaults to 1.0, the middle of the values
    0.5, 1.0 and 2.0 the paper reports on long-tailed CIFAR. (The paper's
    focal variant is sigmoid-based; the softmax form is used here so every
    loss shares the softmax decision rule of the heads.) beta = 0 gives
    equal weights, so the softmax base is then plain cross-entropy.
    """

    balances_prior = True

    BASES = ("softmax", "focal")

    def __init__(
        self,
        class_counts: CountsLike,
        beta: float = 0.9999,
        base: str = "softmax",
        gamma: float = 1.0,
    ) -> None:
        super().__init__(class_counts)
        beta = _check_finite("beta", beta)
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"loss parameter beta must lie in [0, 1); got {beta:g}")
        if base not in self.BASES:
            raise ConfigError(
                f"loss parameter base must be one of {', '.join(self.BASES)}; got {base!r}"
            )
        self.beta = beta
        self.base = base
        self.gamma = _check_at_least("gamma", gamma, 0.0)
        self.register_buffer(
            "class_weights", _buffer(class_balanced_weights(self._counts_np, beta)),
            persistent=False,
        )

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self._check_inputs(logits, target)
        logits = logits.to(_compute_dtype(logits))
        log_pt = F.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
        gamma = self.gamma if self.base == "focal" else 0.0
        per_sample = _focal_terms(log_pt, gamma)
        return (self.class_weights.to(logits.dtype)[target] * per_sample).mean()

    def extra_repr(self) -> str:
        extra = f", gamma={self.gamma:g}" if self.base == "focal" else ""
        return f"num_classes={self.num_classes}, beta={self.beta:g}, base={self.base}{extra}"


@register_loss("balanced_softmax")
class BalancedSoftmaxLoss(LongTailLoss):
    """Balanced softmax: cross-entropy on logits shifted by log class counts.

    Ren et al., "Balanced Meta-Softmax for Long-Tailed Visual Recognition"
    (NeurIPS 2020): loss = mean_i -log( n_{y_i} exp(z_{y_i}) / sum_k n_k exp(z_k) )
    = CE(z_i + log n, y_i). Equal counts give plain cross-entropy.
    """

    balances_prior = True

    def __init__(self, class_counts: CountsLike) -> None:
        super().__init__(class_counts)
        # log n_c and log(n_c / N) differ by a constant, which softmax ignores.
        self.register_buffer("log_prior", _buffer(log_prior(self._counts_np)), persistent=False)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self._check_inputs(logits, target)
        logits = logits.to(_compute_dtype(logits))
        return F.cross_entropy(logits + self.log_prior.to(logits.dtype), target)


@register_loss("ldam")
class LDAMLoss(LongTailLoss):
    """LDAM: label-distribution-aware margins, larger for rare classes, with deferred re-weighting.

    Cao et al., "Learning Imbalanced Datasets with Label-Distribution-Aware
    Margin Loss" (NeurIPS 2019). m_c = K / n_c**(1/4) with K such that
    max_c m_c = ``max_margin`` (0.5), scale ``s`` (30):

        loss = sum_i w_{y_i} l_i / sum_i w_{y_i},
        l_i = -log softmax(s * (z_i - m_{y_i} * onehot(y_i)))[y_i]

    (torch's weighted mean, as in the paper's code). Deferred re-weighting
    (DRW): w = 1 until epoch ``drw_epoch`` (0-based; default
    int(``drw_fraction`` * total_epochs), with drw_fraction 0.8 the paper's
    160 of 200), then the class-balanced weights (1 - beta) / (1 - beta**n_c)
    normalised to sum to C with ``beta`` = 0.9999. (The fraction follows a
    run whose length depends on the file, as stage two's budget does.)
    Re-weighting switches via ``set_epoch``; before the first call there is
    none. max_margin = 0 and s = 1 without re-weighting is plain
    cross-entropy.

    **Scale, one rule per head family** (``family_defaults``). The paper
    applies LDAM to cosine logits in [-1, 1] (its NormedLinear layer), where
    s = 30 makes the largest margin 15 logits: the cosine head uses s = 30
    and hands the loss raw cosines. Every linear-family classifier (the
    linear, tau_norm and lws heads, and stage one's timm classifier) has
    unbounded logits, whose scale its weights learn: there s = 1, so the
    margins act in logit units and the loss's gradients keep the size of
    cross-entropy's. (s = 30 on linear logits multiplies them by 30: a
    15-logit margin, thirty-fold gradients, and training that diverges or
    stops improving in its first epochs.) A value set in params wins.

    **Deferral on fixed features** (``head_defaults``). The paper defers the
    re-weighting to 80% of an end-to-end run so that the representation is
    learnt first; stage one keeps that. A head on fixed features has no
    representation to learn, and its re-weighted phase is what must
    converge: in stage two DRW starts at half the run (``drw_fraction``
    0.5). Measured on the shapes of ``tests/test_convergence.py`` and 30
    Gaussian classes, cosine + LDAM with DRW at 80% of the default budget
    ends 4 to 10 points of few-shot accuracy below its value after four
    times the steps; with DRW at half the run it reaches that value.
    """

    balances_prior = True

    applies_own_scale = True
    family_defaults = {"linear": {"s": 1.0}}
    head_defaults = {"drw_fraction": 0.5}

    def __init__(
        self,
        class_counts: CountsLike,
        max_margin: float = 0.5,
        s: float = 30.0,
        drw_epoch: Optional[int] = None,
        beta: float = 0.9999,
        drw_fraction: float = 0.8,
    ) -> None:
        super().__init__(class_counts)
        self.max_margin = _check_at_least("max_margin", max_margin, 0.0)
        self.s = _check_finite("s", s)
        if self.s <= 0:
            raise ConfigError(f"loss parameter s must be > 0; got {self.s:g}")
        is_integer = isinstance(drw_epoch, (int, np.integer)) and not isinstance(drw_epoch, bool)
        if drw_epoch is not None and (not is_integer or drw_epoch < 0):
            raise ConfigError(
                f"loss parameter drw_epoch must be a non-negative integer; got {drw_epoch!r}"
            )
        self.drw_epoch = None if drw_epoch is None else int(drw_epoch)
        self.drw_fraction = _check_probability("drw_fraction", drw_fraction)
        beta = _check_finite("beta", beta)
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"loss parameter beta must lie in [0, 1); got {beta:g}")
        self.beta = beta
        self.drw_active = False
        self.register_buffer("margins", _buffer(ldam_margins(self._counts_np, self.max_margin)),
                             persistent=False)
        self.register_buffer("drw_weights", _buffer(class_balanced_weights(self._counts_np, beta)),
                             persistent=False)
        self.register_buffer("class_weights", torch.ones(self.num_classes), persistent=False)

    def drw_start(self, total_epochs: int) -> int:
        """First (0-based) epoch with deferred re-weighting for a run of ``total_epochs``."""
        return self.drw_epoch if self.drw_epoch is not None else int(self.drw_fraction * total_epochs)

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        """Switch the class-balanced weights on from ``drw_start(total_epochs)`` onwards."""
        self.drw_active = epoch >= self.drw_start(total_epochs)
        with torch.no_grad():
            if self.drw_active:
                self.class_weights.copy_(self.drw_weights)
            else:
                self.class_weights.fill_(1.0)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self._check_inputs(logits, target)
        logits = logits.to(_compute_dtype(logits))
        margin = self.margins.to(logits.dtype)[target]
        adjusted = logits.scatter_add(1, target[:, None], -margin[:, None])
        weights = self.class_weights.to(logits.dtype)
        return F.cross_entropy(self.s * adjusted, target, weight=weights)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, max_margin={self.max_margin:g}, s={self.s:g}, "
            f"drw_epoch={self.drw_epoch}, drw_active={self.drw_active}"
        )


@register_loss("equalization")
class EqualizationLoss(LongTailLoss):
    """Softmax equalization loss: randomly drops rare classes' negative logits.

    Tan et al., "Equalization Loss for Long-Tailed Object Recognition" (CVPR
    2020), softmax form (SEQL) used for image classification:

        loss = mean_i -log( exp(z_{y_i}) / sum_k w_ik exp(z_k) ),
        w_ik = 1 - beta_ik * T_lambda(f_k) * (1 - y_ik)

    with f_k = n_k / N the class frequency, T_lambda(f) = 1 if f < lambda else
    0, and beta_ik ~ Bernoulli(``gamma``) drawn per sample and class with
    torch's global random generator, or after :meth:`reseed` with a
    generator of the loss's own (stage two reseeds with the cell's seed, so
    the draws of one head never depend on the others trained beside it);
    ``gamma`` = 0.9 as in the paper. Since w_ik is 0 or 1, suppressed logits
    are masked to -inf inside a log-sum-exp. The paper tunes the frequency
    threshold per data set (1.76e-3 on LVIS); here ``lambda_`` defaults to
    None, meaning 1 / C: classes rarer than uniform frequency count as tail,
    a data-set-free choice. gamma = 0 (or no tail class) is cross-entropy.
    """

    balances_prior = True

    def __init__(
        self,
        class_counts: CountsLike,
        gamma: float = 0.9,
        lambda_: Optional[float] = None,
    ) -> None:
        super().__init__(class_counts)
        self.gamma = _check_probability("gamma", gamma)
        if lambda_ is None:
            threshold = 1.0 / self.num_classes
        else:
            threshold = _check_probability("lambda_", lambda_)
        self.lambda_ = lambda_
        self.threshold = threshold
        frequency = self._counts_np / self._counts_np.sum()
        tail = frequency < threshold
        self.register_buffer("tail", torch.as_tensor(tail), persistent=False)
        self._has_tail = bool(tail.any())  # kept on the host: no device sync per step
        self._seed: Optional[int] = None
        self._generator: Optional[torch.Generator] = None

    def reseed(self, seed: int) -> None:
        self._seed, self._generator = int(seed), None

    def _draw_generator(self, device: torch.device) -> Optional[torch.Generator]:
        if self._seed is None:
            return None  # torch's global generator
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self._seed)
        return self._generator

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self._check_inputs(logits, target)
        logits = logits.to(_compute_dtype(logits))
        if self.gamma > 0.0 and self._has_tail:
            generator = self._draw_generator(logits.device)
            drop = torch.rand(logits.shape, device=logits.device, generator=generator) < self.gamma
            drop &= self.tail[None, :]
            drop.scatter_(1, target[:, None], False)  # the target class is never suppressed
            logits = logits.masked_fill(drop, float("-inf"))
        return F.cross_entropy(logits, target)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, gamma={self.gamma:g}, "
            f"lambda={self.threshold:g}, tail_classes={int(self.tail.sum())}"
        )


@register_loss("logit_adjusted")
class LogitAdjustedLoss(LongTailLoss):
    """Logit-adjusted loss: cross-entropy on logits plus tau * log class prior.

    Menon et al., "Long-tail learning via logit adjustment" (ICLR 2021),
    the logit-adjusted softmax cross-entropy:
    loss = mean_i -log softmax(z_i + tau * log pi)[y_i], pi_c = n_c / N,
    ``tau`` = 1. tau = 0 or equal counts give plain cross-entropy; tau = 1
    equals balanced softmax.
    """

    balances_prior = True

    def __init__(self, class_counts: CountsLike, tau: float = 1.0) -> None:
        super().__init__(class_counts)
        self.tau = _check_finite("tau", tau)
        self.register_buffer("log_prior", _buffer(log_prior(self._counts_np)), persistent=False)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self._check_inputs(logits, target)
        logits = logits.to(_compute_dtype(logits))
        return F.cross_entropy(logits + self.tau * self.log_prior.to(logits.dtype), target)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, tau={self.tau:g}"


#: (smooth_head, smooth_tail) of the authors' stage-two configs (MiSLAS,
#: config/*/..._stage2_mislas.yaml), by dataset and imbalance factor.
LABEL_SMOOTHING_PRESETS: Dict[str, Tuple[float, float]] = {
    "cifar10_if100": (0.3, 0.0), "cifar10_if50": (0.2, 0.0), "cifar10_if10": (0.1, 0.0),
    "cifar100_if100": (0.4, 0.1), "cifar100_if50": (0.3, 0.0), "cifar100_if10": (0.2, 0.0),
    "imagenet_lt": (0.3, 0.0), "inaturalist2018": (0.3, 0.0), "places_lt": (0.4, 0.1),
}
LABEL_SMOOTHING_SHAPES = ("concave", "linear", "convex")


def label_aware_smoothing_factors(
    class_counts: CountsLike, smooth_head: float, smooth_tail: float, shape: str = "concave"
) -> np.ndarray:
    """The smoothing factor of each class, (C,), from eps_1 = ``smooth_head``
    for the most frequent class (n_1 images) to eps_K = ``smooth_tail`` for
    the rarest (n_K), with r_c = (n_c - n_K) / (n_1 - n_K) (Zhong et al.
    2021, eq. 6): concave eps_K + (eps_1 - eps_K) sin(pi r / 2); linear
    eps_K + (eps_1 - eps_K) r; convex eps_1 + (eps_1 - eps_K) sin(3 pi / 2 +
    pi r / 2). Equal counts (n_1 = n_K), where the authors' code divides by
    zero, give every class eps_1; an empty class counts as one image (the
    module's convention), which the authors' code does not do."""
    if shape not in LABEL_SMOOTHING_SHAPES:
        raise ConfigError(f"label_aware_smoothing shape must be one of {', '.join(LABEL_SMOOTHING_SHAPES)}; "
                          f"got {shape!r}")
    for name, value in (("smooth_head", smooth_head), ("smooth_tail", smooth_tail)):
        if not 0.0 <= float(value) < 1.0:
            raise ConfigError(f"label_aware_smoothing {name} must lie in [0, 1); got {value}")
    counts = _floored(as_class_counts(class_counts))
    head, tail = float(smooth_head), float(smooth_tail)
    if counts.max() == counts.min():
        return np.full(len(counts), head)
    ratio = (counts - counts.min()) / (counts.max() - counts.min())
    if shape == "concave":
        return tail + (head - tail) * np.sin(np.pi / 2 * ratio)
    if shape == "linear":
        return tail + (head - tail) * ratio
    return head + (head - tail) * np.sin(1.5 * np.pi + np.pi / 2 * ratio)


@register_loss("label_aware_smoothing")
class LabelAwareSmoothingLoss(LongTailLoss):
    """Label-aware smoothing: cross-entropy against targets smoothed more for head classes than for tail ones.

    Zhong et al., "Improving Calibration for Long-Tailed Recognition"
    (MiSLAS, CVPR 2021), Sec. 3.2: with eps_y the smoothing factor of the
    target class (:func:`label_aware_smoothing_factors`, a concave, linear
    or convex function of its training count, from ``smooth_head`` down to
    ``smooth_tail``), loss = mean_i (1 - eps_yi) (-log p_i[y_i]) + eps_yi
    mean_c (-log p_i[c]), p_i = softmax(z_i): the authors' code. Head and
    tail factors default to the authors' config for ``preset`` (CIFAR-10-LT
    at IF = 100: 0.3 and 0.0; :data:`LABEL_SMOOTHING_PRESETS`); setting them
    overrides it. Their stage two pairs it with class-balanced sampling.
    """

    def __init__(self, class_counts: CountsLike, smooth_head: Optional[float] = None,
                 smooth_tail: Optional[float] = None, shape: str = "concave", preset: str = "cifar10_if100") -> None:
        super().__init__(class_counts)
        if preset not in LABEL_SMOOTHING_PRESETS:
            raise ConfigError(f"label_aware_smoothing preset must be one of {', '.join(LABEL_SMOOTHING_PRESETS)}; "
                              f"got {preset!r}")
        default_head, default_tail = LABEL_SMOOTHING_PRESETS[preset]
        self.smooth_head = default_head if smooth_head is None else float(smooth_head)
        self.smooth_tail = default_tail if smooth_tail is None else float(smooth_tail)
        self.shape = shape
        factors = label_aware_smoothing_factors(self._counts_np, self.smooth_head, self.smooth_tail, shape)
        self.register_buffer("smoothing", _buffer(factors), persistent=False)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self._check_inputs(logits, target)
        logits = logits.to(_compute_dtype(logits))
        log_probs = F.log_softmax(logits, dim=-1)
        smoothing = self.smoothing.to(logits.dtype)[target]
        nll = -log_probs.gather(1, target[:, None]).squeeze(1)
        uniform = -log_probs.mean(dim=-1)
        return ((1.0 - smoothing) * nll + smoothing * uniform).mean()

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, smooth_head={self.smooth_head:g}, "
                f"smooth_tail={self.smooth_tail:g}, shape={self.shape}")
