"""Classifier heads on cached features (a registry), scikit-learn style.

``head = create_head("tau_norm")``, then ``head.fit(X, y, X_val=..., y_val=...,
loss="ce")`` and ``head.decision_function(X_test)`` (N, C) or
``head.predict(X_test)`` (N,). ``__init__`` only stores parameters; learned
attributes end in ``_``. ``X`` is (N, D) float features, ``y`` (N,) int labels.

Two kinds of head:

* **trainable** (``trainable = True``: linear, cosine, tau_norm, posthoc_la, lws, disalign) are
  trained by gradient descent with a long-tailed loss and a re-sampler, by
  the fused trainer of :mod:`decouple.stage_two.trainer`. A trainable head
  declares what that trainer needs: its :class:`WeightFamily` (parameters,
  inputs and logit function; :meth:`TrainableHead.weight_family`) and its
  post-fit step (:meth:`TrainableHead.finish`); heads that build the same
  family share one fused pass (:meth:`TrainableHead.fusion_key`). tau_norm and lws
  are post-fit steps on the linear family's weights, so
  :func:`decouple.stage_two.fit.fit_cells` trains those once for all three.
* **training-free** (ncm, knn, finetuned) take no loss or sampler: ncm is
  one matrix product with the class means (on the GPU when torch sees one),
  knn searches a FAISS index over the training points (on the GPU when
  FAISS sees one), finetuned scores with the fine-tuned network's own
  classifier, which the feature file holds (/classifier).

Gradient heads work in the standardised feature space of
:class:`decouple.stage_two.trainer.PreparedData` (every feature centred and
scaled to the same spread with train statistics, row RMS norm 10) and expose
``coef_`` (C, D) and ``intercept_`` (C,) in the original feature space where
the head is linear in the features (``mean_`` and ``scale_`` hold the
standardisation).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from decouple.errors import ConfigError, FeatureFileError
from decouple.features import read_classifier
from decouple.registry import Registry
from decouple.stage_two.config import TrainConfig
from decouple.stage_two.losses import LOSSES, STAGE_ONE, GeneralizedReweightLoss, create_loss, family_settings
from decouple.stage_two.losses import log_prior as class_log_prior
from decouple.stage_two.priors import AssumedPrior, assumed_prior, log_uniform
from decouple.stage_two.samplers import SAMPLER_HOUSEKEEPING, SAMPLERS, create_sampler
from decouple.stage_two.scorers import CosineScorer, DisAlignScorer, KNNScorer, LinearScorer, NCMScorer, Scorer
from decouple.stage_two.trainer import (
    FEATURE_NORM,
    PreparedData,
    TrainedWeights,
    WeightFamily,
    head_block,
    mean_class_score,
    train_heads,
)

HEADS = Registry("head")
register_head = HEADS.register



def create_head(name: str, **params: Any) -> "Head":
    """Build the head registered as ``name``; unknown names and keywords are errors."""
    return HEADS.create(name, where="", **params)


def list_heads() -> List[Tuple[str, str]]:
    """(name, one-line description) of every registered head."""
    return HEADS.describe()


def head_families() -> Dict[str, Tuple[str, ...]]:
    """Each logit family (losses.LOGIT_FAMILIES) with the trainable heads in
    it, in registry order; stage one's classifier is linear."""
    families: Dict[str, Tuple[str, ...]] = {}
    for name in HEADS:
        head_class = HEADS.get(name)
        if head_class.trainable:
            families[head_class.logit_family] = families.get(head_class.logit_family, ()) + (name,)
    families["linear"] = families.get("linear", ()) + (STAGE_ONE,)
    return families


def _as_float32(X: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(X, dtype=np.float32))


def _l2_normalize(X: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norms, 1e-12)


class Head:
    """Base of every head: the scikit-learn estimator contract."""

    #: Whether the head is trained with a loss and a sampler.
    trainable: bool = False
    #: Whether the head re-balances the classes itself (tau-normalisation,
    #: logit adjustment, class means), so that it assumes a uniform test
    #: prior whatever its loss and sampler (:mod:`decouple.stage_two.priors`).
    balances_prior: bool = False
    #: Whether :meth:`decision_function` gives class probabilities (rows
    #: summing to 1) rather than logits; a prior moves them by Bayes' rule.
    scores_are_probabilities: bool = False

    def get_params(self) -> Dict[str, Any]:
        """Constructor parameters and their values (JSON-friendly)."""
        return {name: _plain(getattr(self, name)) for name in HEADS.parameters(self.registered_name())}

    @classmethod
    def registered_name(cls) -> str:
        """The name this head is registered under."""
        for name in HEADS:
            if HEADS.get(name) is cls:
                return name
        return cls.__name__

    def decision_function(self, X: Any) -> np.ndarray:  # pragma: no cover - abstract
        """Class scores (N, C); larger means more likely."""
        raise NotImplementedError

    def predict(self, X: Any) -> np.ndarray:
        """Predicted class of each row (N,)."""
        return self.decision_function(X).argmax(axis=1)

    def selection_(self) -> Dict[str, Any]:
        """What was chosen on val (epoch, tau, ...) and on which split."""
        return {}

    def check_features(self, feature_set: Any) -> None:
        """Refuse a feature set this head cannot fit on (one line naming the
        file), before any cell trains; every feature set by default."""

    @classmethod
    def check_file(cls, path: Any) -> None:
        """:meth:`check_features` from the feature file alone, cheaply, for a
        sweep's plan (before any run); every file by default."""

    def assumed_prior(self, loss: Optional[str], sampler: Optional[str], class_counts: Sequence[int], *,
                      sampler_params: Optional[Mapping[str, Any]] = None, total_epochs: int = 1) -> AssumedPrior:
        """The prior the fitted head's scores assume in a cell of ``loss`` and
        ``sampler`` (:func:`decouple.stage_two.priors.assumed_prior`)."""
        return assumed_prior(self, loss, sampler, class_counts, sampler_params=sampler_params,
                             total_epochs=total_epochs)

    def scorer(self) -> Scorer:
        """The fitted head as a torch module, embeddings (B, D) -> the scores
        of :meth:`decision_function` (:mod:`decouple.stage_two.scorers`); a
        head without one cannot be saved as a model."""
        raise ConfigError(
            f"head {self.registered_name()!r} cannot be saved as a model: it defines no scorer() "
            f"(decouple/stage_two/scorers.py)"
        )


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return value


# ---------------------------------------------------------------------------
# Weight families: what the fused trainer trains for each kind of head.
# ---------------------------------------------------------------------------


class LinearFamily(WeightFamily):
    """logits = x W^T + b on the standardised features; W (K * C, D) starts
    near zero (uniform logits), b at zero. The penalty weight_decay / 2 *
    ||W||^2 applies to W only: ``weight_decay``, else the training config's.

    ``max_norm``: weight balancing's MaxNorm constraint (Alshammari et al.,
    CVPR 2022): after every optimiser step each class's weight row w_c is
    projected onto the ball ||w_c|| <= max_norm (projected gradient descent;
    the bias is not constrained, as in the authors' code). The norm is that
    of the standardised feature space, where a row's norm is FEATURE_NORM, so
    max_norm caps a class's logit (bias aside) at FEATURE_NORM * max_norm.
    """

    def __init__(self, *, max_norm: Optional[float] = None, weight_decay: Optional[float] = None) -> None:
        self.max_norm, self.weight_decay = max_norm, weight_decay

    def parameters(self, num_heads, num_classes, dim, *, generator, device, train):
        initial = torch.randn(num_classes, dim, generator=generator).mul_(0.01 / FEATURE_NORM)
        weight = initial.repeat(num_heads, 1).to(device).requires_grad_(True)
        bias = torch.zeros(num_heads * num_classes, device=device, requires_grad=True)
        decay = train.weight_decay if self.weight_decay is None else float(self.weight_decay)
        groups = [{"params": [weight], "weight_decay": decay}, {"params": [bias], "weight_decay": 0.0}]
        return {"weight": weight, "bias": bias}, groups

    @torch.no_grad()
    def project(self, params):
        if self.max_norm is not None:
            weight = params["weight"]
            weight.mul_((self.max_norm / weight.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp_max(1.0))

    def logits(self, x, params, dtype):
        if dtype != torch.float32:
            return F.linear(x, params["weight"].to(dtype)).float() + params["bias"]
        return F.linear(x, params["weight"], params["bias"])


class CosineFamily(WeightFamily):
    """logits = s_k * cos(x, w_c) on the standardised features scaled to unit
    norm, no bias; W starts as unit rows (their norm sets the step size of
    their direction) and has no penalty (the logits do not depend on its
    norm). ``logit_scales``: s_k of each head."""

    def __init__(self, logit_scales: Sequence[float]) -> None:
        self.logit_scales = [float(scale) for scale in logit_scales]

    def inputs(self, data, split):
        return data.normalized(split)

    def parameters(self, num_heads, num_classes, dim, *, generator, device, train):
        initial = F.normalize(torch.randn(num_classes, dim, generator=generator), dim=1)
        weight = initial.repeat(num_heads, 1).to(device).requires_grad_(True)
        self._scales = torch.tensor(self.logit_scales, dtype=torch.float32, device=device).repeat_interleave(
            num_classes
        )
        return {"weight": weight}, [{"params": [weight], "weight_decay": 0.0}]

    def logits(self, x, params, dtype):
        directions = F.normalize(params["weight"], dim=1)
        if dtype != torch.float32:
            return F.linear(x, directions.to(dtype)).float() * self._scales
        return F.linear(x, directions) * self._scales

    def head_params(self, params, k, num_heads):
        kept = super().head_params(params, k, num_heads)
        # The scale as the logits saw it (float32).
        return {"weight": F.normalize(kept["weight"], dim=1), "logit_scale": float(head_block(self._scales, k, num_heads)[0])}


class ScaledLogitsFamily(WeightFamily):
    """LWS's logits s_c * z_c + b_c on the frozen logits z = x W^T of a
    trained linear head (one head: K = 1); s starts at 1, b at the trained
    bias, which is learned too when ``learn_bias``. No penalty."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, *, learn_bias: bool) -> None:
        self.weight, self.bias, self.learn_bias = weight, bias, bool(learn_bias)

    @torch.no_grad()
    def inputs(self, data, split):
        x = data.x if split == "train" else data.x_val
        return None if x is None else x @ self.weight.t()  # (N, C)

    def parameters(self, num_heads, num_classes, dim, *, generator, device, train):
        scales = torch.ones(num_classes, device=device, requires_grad=True)
        bias = self.bias.detach().clone().requires_grad_(self.learn_bias)
        trained = [scales] + ([bias] if self.learn_bias else [])
        return {"scales": scales, "bias": bias}, [{"params": trained, "weight_decay": 0.0}]

    def logits(self, x, params, dtype):
        return x * params["scales"] + params["bias"]

    def macs_per_step(self, rows, dim, num_heads, num_classes):
        return rows * num_classes


# ---------------------------------------------------------------------------
# Trainable heads.
# ---------------------------------------------------------------------------


class AffineHead(Head):
    """A head whose scores are one affine map of the features, ``X coef_^T +
    intercept_`` (coef_ (C, D), intercept_ (C,)), and whose model is that map."""

    def decision_function(self, X: Any) -> np.ndarray:
        return _as_float32(X) @ self.coef_.T + self.intercept_

    def scorer(self) -> Scorer:
        return LinearScorer(torch.from_numpy(self.coef_), torch.from_numpy(self.intercept_))


class TrainableHead(AffineHead):
    """A head trained by the fused trainer of :mod:`decouple.stage_two.trainer`.

    A subclass declares what the trainer needs and nothing else:
    :meth:`weight_family` (what is trained), :meth:`finish` (the post-fit
    step from the trained parameters to ``coef_``, ``tau_``, ...) and, where
    its losses' settings differ by logit family, ``logit_family``.
    Registering it with ``@register_head`` is all it takes to sweep it.
    """

    trainable = True
    #: The family of its logits, which picks the losses' settings
    #: (losses.LOGIT_FAMILIES): "linear" (W x + b) or "cosine" (cos(x, w)).
    logit_family: str = "linear"
    #: Weight balancing (Alshammari et al., CVPR 2022) of the linear family's
    #: weights: a per-class norm cap and the weight decay, None for none and
    #: for the training config's (:class:`LinearFamily`). The heads trained
    #: on linear weights (linear, tau_norm, posthoc_la, lws, disalign) take both as
    #: parameters, so that sweeps can grid over them (``vary:``).
    max_norm: Optional[float] = None
    weight_decay: Optional[float] = None

    # -- what the fused trainer needs to know ------------------------------

    def fusion_key(self) -> Tuple:
        """Heads with equal keys train in one fused pass (and share the
        weights of equal losses): by default the implementation of
        :meth:`weight_family`, so the heads that inherit it (linear, tau_norm,
        lws) share one pass, and a head that builds its own family never
        joins another's."""
        return (type(self).weight_family, self.max_norm, self.weight_decay)

    def weight_family(self, losses: Sequence[Any]) -> WeightFamily:
        """The :class:`WeightFamily` that trains this head's weights, one
        head per loss module of ``losses``."""
        return LinearFamily(max_norm=self.max_norm, weight_decay=self.weight_decay)

    def training_loss_params(self, loss: str, given: Mapping[str, Any]) -> Dict[str, Any]:
        """Loss settings used to train the weights: ``given`` over the loss's
        defaults for this head's family and for a head on fixed features
        (LDAM's scale s and re-weighting start, see
        :func:`decouple.stage_two.losses.family_settings`)."""
        return family_settings(loss, self.logit_family, dict(given), fixed_features=True)

    def check_settings(
        self,
        loss: str,
        sampler: str,
        settings: Mapping[str, Mapping[str, Any]],
        *,
        class_counts: np.ndarray,
        train: TrainConfig,
    ) -> None:
        """Build the loss and sampler once so bad settings fail before training."""
        name = self.registered_name()
        for setting, low, strict in (("max_norm", 0.0, True), ("weight_decay", 0.0, False)):
            value = getattr(self, setting)
            ok = value is None or (
                isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
                and (value > low if strict else value >= low)
            )
            if not ok:
                bound = "> 0" if strict else ">= 0"
                raise ConfigError(f"head parameter {setting} of {name} must be a number {bound} (or null); got {value!r}")
        labels = np.repeat(np.arange(len(class_counts)), class_counts)
        create_loss(loss, class_counts=class_counts, **self.training_loss_params(loss, settings["loss"]))
        create_sampler(sampler, labels, total_epochs=train.epochs_for(len(labels)), **settings["sampler"])

    # -- fitting -----------------------------------------------------------

    def fit(
        self,
        X: Any,
        y: Any,
        *,
        X_val: Any = None,
        y_val: Any = None,
        loss: str = "ce",
        sampler: str = "instance",
        loss_params: Optional[Mapping[str, Any]] = None,
        sampler_params: Optional[Mapping[str, Any]] = None,
        seed: int = 0,
        train: Optional[TrainConfig] = None,
        num_classes: Optional[int] = None,
    ) -> "TrainableHead":
        """Train on ``X`` (N, D), ``y`` (N,) with ``loss`` and ``sampler``;
        the epoch (and tau) are chosen on ``X_val``, ``y_val`` when given."""
        train = (train or TrainConfig()).validated().for_rows(len(y))
        loss_params = dict(loss_params or {})
        sampler_params = dict(sampler_params or {})
        data = PreparedData.from_arrays(
            _as_float32(X),
            np.asarray(y),
            val_features=None if X_val is None else _as_float32(X_val),
            val_labels=None if y_val is None else np.asarray(y_val),
            num_classes=num_classes,
            device=train.resolved_device(),
        )
        loss_module = create_loss(
            loss, class_counts=data.class_counts, **self.training_loss_params(loss, loss_params)
        )
        sampler_object = create_sampler(
            sampler, np.asarray(y), total_epochs=train.epochs, seed=seed, **sampler_params
        )
        trained = train_heads(
            data, [loss_module], sampler=sampler_object, family=self.weight_family([loss_module]), seed=seed,
            train=train,
        )[0]
        return self.fit_from_weights(
            trained, data, loss=loss, sampler=sampler, loss_params=loss_params, sampler_params=sampler_params,
            seed=seed, train=train,
        )

    def fit_from_weights(
        self,
        trained: TrainedWeights,
        data: PreparedData,
        *,
        loss: str,
        sampler: str,
        loss_params: Mapping[str, Any],
        sampler_params: Mapping[str, Any],
        seed: int,
        train: TrainConfig,
    ) -> "TrainableHead":
        """Finish fitting from parameters the fused trainer produced: record
        the settings and the epoch chosen, then run :meth:`finish`."""
        resolved_loss = {k: v for k, v in LOSSES.parameters(loss).items() if k != "class_counts"}
        resolved_loss.update(self.training_loss_params(loss, loss_params))
        resolved_sampler = {
            k: v for k, v in SAMPLERS.parameters(sampler).items() if k not in SAMPLER_HOUSEKEEPING
        }
        resolved_sampler.update(sampler_params)
        self.loss_ = loss
        self.sampler_ = sampler
        self.loss_params_ = {k: _plain(v) for k, v in resolved_loss.items()}
        self.sampler_params_ = {k: _plain(v) for k, v in resolved_sampler.items()}
        self.seed_ = int(seed)
        self.epoch_ = int(trained.epoch)
        self.selected_on_ = trained.selected_on
        self.val_history_ = list(trained.history)
        self.mean_ = data.mean.detach().cpu().numpy()
        self.scale_ = data.scale.detach().cpu().numpy()
        self.finish(trained, data, seed=seed, train=train)
        return self

    def finish(self, trained: TrainedWeights, data: PreparedData, *, seed: int, train: TrainConfig) -> None:
        """The post-fit step: set the learned attributes from ``trained``'s
        parameters (in ``data``'s standardised space), choosing any post-hoc
        setting on ``data``'s val split."""
        raise NotImplementedError  # pragma: no cover

    def _set_linear(self, weight_std: np.ndarray, bias_std: Optional[np.ndarray]) -> None:
        """coef_ / intercept_ in the original space from standardised-space weights (C, D)."""
        coef = (weight_std * self.scale_[None, :]).astype(np.float32)
        intercept = -(coef @ self.mean_.astype(np.float32))
        if bias_std is not None:
            intercept = intercept + bias_std
        self.coef_ = coef
        self.intercept_ = intercept.astype(np.float32)
        self.classes_ = np.arange(coef.shape[0])

    def selection_(self) -> Dict[str, Any]:
        return {"epoch": self.epoch_, "selected_on": self.selected_on_}


@register_head("linear")
class LinearHead(TrainableHead):
    """Linear classifier W x + b, trained with the cell's loss and sampler.

    The classifier-retraining baseline (cRT) of Kang et al., "Decoupling
    Representation and Classifier for Long-Tailed Recognition" (ICLR 2020),
    when trained class-balanced. Like every head of the linear family
    (linear, tau_norm, posthoc_la, lws, disalign), it trains losses with their linear-family
    settings (``decouple list losses``; LDAM's scale s).

    Weight balancing (Alshammari et al., "Long-Tailed Recognition via Weight
    Balancing", CVPR 2022), for every head of the linear family:
    ``max_norm`` caps each class's weight norm by projection after every
    step (MaxNorm; in the standardised feature space, see
    :class:`LinearFamily`) and ``weight_decay`` replaces the training
    config's; both are None (off, and the config's) by default. Their stage
    two is ``class_balanced`` loss with both; grid them in a sweep's
    ``vary:`` and let val choose.
    """

    def __init__(self, max_norm: Optional[float] = None, weight_decay: Optional[float] = None) -> None:
        self.max_norm = max_norm
        self.weight_decay = weight_decay

    def finish(self, trained, data, *, seed, train) -> None:
        self._set_linear(trained.params["weight"].cpu().numpy(), trained.params["bias"].cpu().numpy())


@register_head("cosine")
class CosineHead(TrainableHead):
    """Cosine classifier s * cos(x, w_c), no bias.

    Normalised-weight classifier as used with LDAM by Cao et al. (NeurIPS
    2019) and analysed by Kang et al. (ICLR 2020). ``scale`` s (16) sets the
    softmax temperature; a loss with its own scale (ldam's s) replaces it.
    x is the standardised feature (centred, every feature scaled to the same
    spread; :class:`decouple.stage_two.trainer.PreparedData`), the decoupled
    counterpart of the batch-normalised embedding a network would feed it:
    the raw pooled features of a ReLU network all lie in one narrow cone,
    where cosines barely separate the classes.
    """

    logit_family = "cosine"

    def __init__(self, scale: float = 16.0) -> None:
        self.scale = scale

    def fusion_key(self) -> Tuple:
        return super().fusion_key() + (float(self.scale),)

    def weight_family(self, losses: Sequence[Any]) -> WeightFamily:
        return CosineFamily([self.training_logit_scale(loss) for loss in losses])

    def training_logit_scale(self, loss_module: Any) -> float:
        """s for this loss: 1 when the loss applies its own scale (LDAM's s,
        which Cao et al. apply to raw cosines), else ``scale``."""
        if not (isinstance(self.scale, (int, float)) and self.scale > 0):
            raise ConfigError(f"head parameter scale of cosine must be > 0; got {self.scale!r}")
        return 1.0 if loss_module.applies_own_scale else float(self.scale)

    def finish(self, trained, data, *, seed, train) -> None:
        self.coef_ = trained.params["weight"].cpu().numpy().astype(np.float32)  # unit rows
        self.logit_scale_ = float(trained.params["logit_scale"])
        self.classes_ = np.arange(self.coef_.shape[0])

    def decision_function(self, X: Any) -> np.ndarray:
        standardized = (_as_float32(X) - self.mean_) * self.scale_
        return self.logit_scale_ * (_l2_normalize(standardized) @ self.coef_.T)

    def scorer(self) -> Scorer:
        return CosineScorer(
            torch.from_numpy(np.asarray(self.mean_, dtype=np.float32)),
            torch.from_numpy(np.asarray(self.scale_, dtype=np.float32)),
            torch.from_numpy(self.coef_),
            self.logit_scale_,
        )


DEFAULT_TAUS = tuple(round(0.1 * index, 1) for index in range(21))


@register_head("tau_norm")
class TauNormHead(TrainableHead):
    """tau-normalised classifier: w_c / ||w_c||**tau of a trained linear head, tau chosen on val.

    Kang et al., "Decoupling Representation and Classifier for Long-Tailed
    Recognition" (ICLR 2020), Sec. 4: after training, each class weight is
    divided by its norm to the power tau, which evens out the larger norms
    that head classes acquire. The norms are those of the weights as trained,
    in the standardised feature space. The bias is dropped (the rule rescales
    weights only); features are centred on the training mean, so the result
    is a centred linear rule. ``taus``: the grid searched on val (0, 0.1,
    ..., 2); without val, tau = 1. ``max_norm``, ``weight_decay``: weight
    balancing of the trained weights (:class:`LinearHead`).
    """

    balances_prior = True

    def __init__(self, taus: Sequence[float] = DEFAULT_TAUS, max_norm: Optional[float] = None,
                 weight_decay: Optional[float] = None) -> None:
        self.taus = taus
        self.max_norm = max_norm
        self.weight_decay = weight_decay

    def finish(self, trained, data, *, seed, train) -> None:
        taus = _checked_taus(self.registered_name(), self.taus)
        weight = trained.params["weight"]
        norms = weight.norm(dim=1).clamp_min(1e-12)
        if data.x_val is not None:
            with torch.no_grad():
                stacked = torch.cat([weight / norms[:, None] ** tau for tau in taus])  # (T * C, D)
                logits = (data.x_val @ stacked.t()).view(len(data.x_val), len(taus), -1)
        self._choose_tau(taus, None if data.x_val is None else logits, data, default=1.0)
        normalized = (weight / norms[:, None] ** self.tau_).cpu().numpy()
        self._set_linear(normalized, None)

    def _choose_tau(self, taus: List[float], logits: Optional[torch.Tensor], data: PreparedData, *,
                    default: float) -> None:
        """tau_ (and tau_scores_, tau_selected_on_): the tau of ``taus`` whose
        val logits (N_val, T, C) score the best mean class accuracy (the first
        of equals), or ``default`` without val."""
        if logits is not None:
            predictions = logits.argmax(dim=2)
            scores = mean_class_score(predictions, data.y_val, data.num_classes).cpu().numpy()
            self.tau_ = taus[int(np.argmax(scores))]
            self.tau_scores_ = [float(score) for score in scores]
            self.tau_selected_on_ = "val"
        else:
            self.tau_, self.tau_scores_, self.tau_selected_on_ = default, [], "default"

    def selection_(self) -> Dict[str, Any]:
        return {"epoch": self.epoch_, "tau": self.tau_, "selected_on": self.selected_on_}


def _checked_taus(head: str, taus: Any) -> List[float]:
    """``taus`` as a non-empty list of finite floats, else a ConfigError naming ``head``."""
    try:
        checked = [float(tau) for tau in taus]
    except (TypeError, ValueError):
        checked = []
    if not checked or not all(np.isfinite(checked)):
        raise ConfigError(f"head parameter taus of {head} must be a non-empty list of numbers; got {taus!r}")
    return checked


@register_head("posthoc_la")
class PosthocLogitAdjustedHead(TauNormHead):
    """Post-hoc logit adjustment: argmax_y f_y(x) - tau log pi_y of a trained linear head, tau chosen on val.

    Menon et al., "Long-tail learning via logit adjustment" (ICLR 2021),
    Sec. 4 (eq. 9): a classifier trained with plain cross-entropy estimates
    P(y | x) under the training prior pi; subtracting tau log pi_y from its
    logits moves the decision towards the balanced error's optimum (tau = 1
    exactly, under a well-calibrated model). pi is the training prior
    (class counts / N); tau is chosen on val from ``taus`` (0, 0.1, ..., 2,
    the paper's range; tau = 0 is the unadjusted head), else tau = 1. The
    linear head is trained with the cell's loss, plain cross-entropy in the
    paper; it shares linear's fused pass and weights.
    """

    def finish(self, trained, data, *, seed, train) -> None:
        taus = _checked_taus(self.registered_name(), self.taus)
        weight, bias = trained.params["weight"], trained.params["bias"]
        # An empty class counts as one image (the losses' convention), so its log prior stays finite.
        log_prior = torch.as_tensor(class_log_prior(data.class_counts), dtype=weight.dtype, device=weight.device)
        if data.x_val is not None:
            with torch.no_grad():
                base = data.x_val @ weight.t() + bias  # (N_val, C)
                shifts = torch.tensor(taus, dtype=weight.dtype, device=weight.device)[:, None] * log_prior
                logits = base[:, None, :] - shifts[None, :, :]  # (N_val, T, C)
        self._choose_tau(taus, None if data.x_val is None else logits, data, default=1.0)
        self.log_prior_ = log_prior.cpu().numpy()
        adjusted = (bias - self.tau_ * log_prior).cpu().numpy()
        self._set_linear(weight.cpu().numpy(), adjusted)


@register_head("lws")
class LWSHead(TrainableHead):
    """Learnable weight scaling: per-class scales on a frozen linear head, trained class-balanced.

    Kang et al., "Decoupling Representation and Classifier for Long-Tailed
    Recognition" (ICLR 2020), Sec. 4: logits f_c = s_c * w_c^T x with w
    frozen and s learned by cross-entropy under class-balanced sampling.
    Here the bias is relearned with the scales (``learn_bias``), since a
    frozen bias would keep the head-class prior that the scales undo. The
    linear head itself is trained with the cell's loss and sampler; the
    scales are a second run of the fused trainer (:class:`ScaledLogitsFamily`)
    for ``epochs`` (default: the training epochs), their epoch chosen on val.
    ``max_norm``, ``weight_decay``: weight balancing of the linear head's
    weights (:class:`LinearHead`).
    """

    balances_prior = True

    def __init__(self, learn_bias: bool = True, epochs: Optional[int] = None, max_norm: Optional[float] = None,
                 weight_decay: Optional[float] = None) -> None:
        self.learn_bias = learn_bias
        self.epochs = epochs
        self.max_norm = max_norm
        self.weight_decay = weight_decay

    def finish(self, trained, data, *, seed, train) -> None:
        epochs = int(self.epochs if self.epochs is not None else train.epochs)
        if epochs < 1:
            raise ConfigError(f"head parameter epochs of lws must be >= 1; got {self.epochs!r}")
        weight = trained.params["weight"]
        family = ScaledLogitsFamily(weight, trained.params["bias"], learn_bias=self.learn_bias)
        sampler = create_sampler("class_balanced", data.y.cpu().numpy(), total_epochs=epochs, seed=seed)
        # The scales train in float32 whatever the precision: their products are element-wise.
        scale_train = replace(train, epochs=epochs, precision="float32")
        ce = create_loss("ce", class_counts=data.class_counts)
        scaled = train_heads(data, [ce], sampler=sampler, family=family, seed=seed, train=scale_train)[0]
        self.scale_epoch_ = scaled.epoch
        self.scales_ = scaled.params["scales"].cpu().numpy()
        self.scale_history_ = scaled.history
        self._set_linear(
            (weight * scaled.params["scales"][:, None]).detach().cpu().numpy(),
            scaled.params["bias"].detach().cpu().numpy(),
        )

    def selection_(self) -> Dict[str, Any]:
        return {"epoch": self.epoch_, "scale_epoch": self.scale_epoch_, "selected_on": self.selected_on_}


# ---------------------------------------------------------------------------
# DisAlign: input-dependent alignment of a frozen linear head.
# ---------------------------------------------------------------------------


class AlignmentFamily(WeightFamily):
    """DisAlign's aligned logits on a frozen linear head W x + b:

        z'_c = (1 + sigma(v.x + b_v) * alpha_c) * z_c + sigma(v.x + b_v) * beta_c,  z = W x + b

    Its inputs are the standardised features x and the frozen logits z side
    by side, (N, D + C), so that a step computes only the confidence v.x.
    Per head k (parameters stacked in K blocks): alpha (C,) from 1 and beta
    (C,) from 0, v (D,) from 0.1 everywhere and b_v from U(-1/sqrt(D),
    1/sqrt(D)), the initialisation of the authors' ``DisAlignLinear`` (cvpods),
    whose confidence layer is an ``nn.Linear(D, 1)`` with bias. The
    penalty ``train.weight_decay`` applies to v only, as to the linear
    family's W; alpha, beta and b_v are not penalised (as LWS's scales)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.weight, self.bias = weight, bias

    @torch.no_grad()
    def inputs(self, data, split):
        x = data.x if split == "train" else data.x_val
        return None if x is None else torch.cat([x, x @ self.weight.t() + self.bias], dim=1)  # (N, D + C)

    def parameters(self, num_heads, num_classes, dim, *, generator, device, train):
        features = dim - num_classes
        bound = 1.0 / np.sqrt(features)
        confidence_bias = (torch.rand(1, generator=generator) * 2.0 - 1.0) * bound
        alpha = torch.ones(num_heads * num_classes, device=device, requires_grad=True)
        beta = torch.zeros(num_heads * num_classes, device=device, requires_grad=True)
        confidence_weight = torch.full((num_heads, features), 0.1, device=device, requires_grad=True)
        confidence_bias = confidence_bias.repeat(num_heads).to(device).requires_grad_(True)
        params = {"alpha": alpha, "beta": beta, "confidence_weight": confidence_weight,
                  "confidence_bias": confidence_bias}
        groups = [{"params": [confidence_weight], "weight_decay": train.weight_decay},
                  {"params": [alpha, beta, confidence_bias], "weight_decay": 0.0}]
        return params, groups

    def logits(self, x, params, dtype):
        num_heads = params["confidence_weight"].shape[0]
        features = params["confidence_weight"].shape[1]
        frozen = x[:, features:].float()  # (B, C)
        confidence = torch.sigmoid(
            F.linear(x[:, :features].float(), params["confidence_weight"], params["confidence_bias"])
        )  # (B, K)
        alpha = params["alpha"].view(num_heads, -1)
        beta = params["beta"].view(num_heads, -1)
        aligned = (1.0 + confidence[:, :, None] * alpha) * frozen[:, None, :] + confidence[:, :, None] * beta
        return aligned.reshape(len(x), -1)  # (B, K * C)

    def macs_per_step(self, rows, dim, num_heads, num_classes):
        return rows * num_heads * (dim + 2 * num_classes)


def _sigmoid(values: np.ndarray) -> np.ndarray:
    # tanh form: no overflow in exp for large |values|.
    return 0.5 * (1.0 + np.tanh(0.5 * values))


#: GRW's exponent rho in the authors' ImageNet-LT configuration (``GRW_SCALE``).
DISALIGN_RHO = 1.2


@register_head("disalign")
class DisAlignHead(TrainableHead):
    """DisAlign: input-dependent magnitude and margin on a frozen linear head, trained with GRW.

    Zhang et al., "Distribution Alignment: A Unified Framework for Long-tail
    Visual Recognition" (CVPR 2021), Sec. 3.2-3.3: the logits z = W x + b of
    the trained linear head are aligned as (1 + sigma(v.x + b_v) * alpha) * z
    + sigma(v.x + b_v) * beta (alpha, beta per class; the confidence sigma
    per image), with W and b frozen and alpha, beta, v, b_v learned by
    generalized re-weighting (:class:`~decouple.stage_two.losses.GeneralizedReweightLoss`:
    class weights ~ (1 / r_c)**``rho``, r_c the training fraction of class c;
    ``rho`` 1.2, the authors' ImageNet-LT setting) under instance sampling,
    as the authors train their second stage. The linear head itself is
    trained with the cell's loss and sampler and shares linear's fused pass;
    the alignment is a second run of the fused trainer
    (:class:`AlignmentFamily`) for ``epochs`` (default: the training epochs),
    its epoch chosen on val. ``max_norm``, ``weight_decay``: weight
    balancing of the linear head's weights (:class:`LinearHead`). The head
    is not linear in x (sigma), so it has no ``coef_``; it scores the
    standardised features directly.
    """

    balances_prior = True  # its alignment is trained with generalized re-weighting

    def __init__(self, rho: float = DISALIGN_RHO, epochs: Optional[int] = None, max_norm: Optional[float] = None,
                 weight_decay: Optional[float] = None) -> None:
        self.rho = rho
        self.epochs = epochs
        self.max_norm = max_norm
        self.weight_decay = weight_decay

    def _checked_rho(self) -> float:
        rho = self.rho
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not np.isfinite(rho) or rho < 0:
            raise ConfigError(f"head parameter rho of disalign must be a finite number >= 0; got {rho!r}")
        return float(rho)

    def _checked_epochs(self) -> Optional[int]:
        epochs = self.epochs
        if epochs is None:
            return None
        if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
            raise ConfigError(f"head parameter epochs of disalign must be an integer >= 1 (or null); got {epochs!r}")
        return int(epochs)

    def check_settings(self, loss, sampler, settings, *, class_counts, train) -> None:
        self._checked_rho()
        self._checked_epochs()
        super().check_settings(loss, sampler, settings, class_counts=class_counts, train=train)

    def finish(self, trained, data, *, seed, train) -> None:
        rho, epochs = self._checked_rho(), self._checked_epochs()
        epochs = int(train.epochs) if epochs is None else epochs
        weight, bias = trained.params["weight"], trained.params["bias"]
        family = AlignmentFamily(weight, bias)
        sampler = create_sampler("instance", data.y.cpu().numpy(), total_epochs=epochs, seed=seed)
        # The alignment trains in float32 whatever the precision: its products are small.
        align_train = replace(train, epochs=epochs, precision="float32")
        grw = GeneralizedReweightLoss(data.class_counts, power=rho)
        aligned = train_heads(data, [grw], sampler=sampler, family=family, seed=seed, train=align_train)[0]
        self.align_epoch_ = aligned.epoch
        self.align_history_ = aligned.history
        self.class_weights_ = grw.class_weights.cpu().numpy()
        self.weight_ = weight.detach().cpu().numpy().astype(np.float32)  # (C, D), standardised space
        self.bias_ = bias.detach().cpu().numpy().astype(np.float32)
        self.alpha_ = aligned.params["alpha"].detach().cpu().numpy()
        self.beta_ = aligned.params["beta"].detach().cpu().numpy()
        self.confidence_weight_ = aligned.params["confidence_weight"][0].detach().cpu().numpy()  # (D,)
        self.confidence_bias_ = float(aligned.params["confidence_bias"][0])
        self.classes_ = np.arange(self.weight_.shape[0])

    def _standardized(self, X: Any) -> np.ndarray:
        return (_as_float32(X) - self.mean_) * self.scale_

    def confidence(self, X: Any) -> np.ndarray:
        """sigma(v.x + b_v) of each row (N,), x the standardised feature."""
        return _sigmoid(self._standardized(X) @ self.confidence_weight_ + self.confidence_bias_)

    def decision_function(self, X: Any) -> np.ndarray:
        standardized = self._standardized(X)
        logits = standardized @ self.weight_.T + self.bias_
        confidence = _sigmoid(standardized @ self.confidence_weight_ + self.confidence_bias_)[:, None]
        return ((1.0 + confidence * self.alpha_) * logits + confidence * self.beta_).astype(np.float32)

    def scorer(self) -> Scorer:
        return DisAlignScorer(
            *(torch.from_numpy(np.asarray(value, dtype=np.float32)) for value in (
                self.mean_, self.scale_, self.weight_, self.bias_, self.confidence_weight_,
                [self.confidence_bias_], self.alpha_, self.beta_,
            ))
        )

    def selection_(self) -> Dict[str, Any]:
        return {"epoch": self.epoch_, "align_epoch": self.align_epoch_, "selected_on": self.selected_on_}


# ---------------------------------------------------------------------------
# Training-free heads (FAISS).
# ---------------------------------------------------------------------------

METRICS = ("cosine", "l2")


def faiss_index(vectors: np.ndarray, *, metric: str):
    """A flat FAISS index over ``vectors`` (M, D): inner product for "cosine"
    (rows are expected L2-normalised), squared L2 for "l2"; moved to the GPU
    when FAISS sees one. Returns (index, gpu_resources or None)."""
    vectors = _as_float32(vectors)
    dim = vectors.shape[1]
    index = faiss.IndexFlatIP(dim) if metric == "cosine" else faiss.IndexFlatL2(dim)
    resources = None
    num_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if num_gpus > 0:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, index)
    index.add(vectors)
    return index, resources


def _check_metric(head: str, metric: str) -> str:
    if metric not in METRICS:
        raise ConfigError(f"head parameter metric of {head} must be one of {', '.join(METRICS)}; got {metric!r}")
    return metric


def _num_classes(y: np.ndarray, num_classes: Optional[int]) -> int:
    return int(num_classes if num_classes is not None else y.max() + 1)


class SearchHead(Head):
    """A training-free head that searches a FAISS index."""

    trainable = False

    def fit(self, X: Any, y: Any, *, num_classes: Optional[int] = None, **ignored: Any) -> "SearchHead":
        raise NotImplementedError  # pragma: no cover

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("index_", None)
        state.pop("_resources", None)
        return state


#: Rows scored per matrix product by a nearest-class-mean head (bounds its
#: memory to this many rows x C scores, on the CPU or the GPU).
NCM_ROWS = 4096


def search_device() -> str:
    """Where a training-free head computes its scores: the GPU when torch sees one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@register_head("ncm")
class NCMHead(Head):
    """Nearest class mean of L2-normalised features, by cosine or L2, as one matrix product.

    The training-free baseline of Kang et al. (ICLR 2020), Sec. 4: every
    class is the mean of its L2-normalised training features; a query goes
    to the nearest mean. ``metric`` "cosine" (default) normalises the means
    too and scores by cosine similarity; "l2" scores by minus the squared
    Euclidean distance to the (unnormalised) means. The scores of all C
    means are one product of the queries with the (C, D) means, in chunks of
    NCM_ROWS rows, on the GPU when there is one: any number of classes (a
    FAISS GPU search caps k, here C, at 2048). The same module
    (:class:`~decouple.stage_two.scorers.NCMScorer`) scores a saved model.
    """

    trainable = False
    balances_prior = True

    def __init__(self, metric: str = "cosine") -> None:
        self.metric = metric

    def fit(self, X: Any, y: Any, *, num_classes: Optional[int] = None, **ignored: Any) -> "NCMHead":
        metric = _check_metric("ncm", self.metric)
        X = _l2_normalize(_as_float32(X))
        y = np.asarray(y, dtype=np.int64)
        num_classes = _num_classes(y, num_classes)
        sums = np.zeros((num_classes, X.shape[1]), dtype=np.float64)
        np.add.at(sums, y, X)
        counts = np.bincount(y, minlength=num_classes)
        means = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
        if metric == "cosine":
            means = _l2_normalize(means)
        self.means_ = means
        self.classes_ = np.arange(num_classes)
        return self

    @torch.no_grad()
    def decision_function(self, X: Any) -> np.ndarray:
        device = search_device()
        scorer = self.scorer().to(device)
        queries = torch.from_numpy(_as_float32(X))
        scores = np.empty((len(queries), len(self.means_)), dtype=np.float32)
        for start in range(0, len(queries), NCM_ROWS):
            chunk = queries[start : start + NCM_ROWS].to(device)
            scores[start : start + len(chunk)] = scorer(chunk).cpu().numpy()
        return scores

    def scorer(self) -> Scorer:
        return NCMScorer(torch.from_numpy(self.means_), metric=self.metric)


@register_head("knn")
class KNNHead(SearchHead):
    """k nearest neighbours of L2-normalised features via FAISS, similarity-weighted votes.

    The non-parametric baseline (e.g. Wu et al., "Unsupervised Feature
    Learning via Non-Parametric Instance Discrimination", CVPR 2018, used
    by DINO): a class scores sum over its neighbours among the ``k`` (10)
    nearest of exp(cos / ``temperature``) (0.07); with metric "l2" the
    weight is exp(-||x - x_j||^2 / (2 temperature)), the same ranking.
    Scores are normalised to sum to 1 per row.
    """

    scores_are_probabilities = True

    def __init__(self, k: int = 10, metric: str = "cosine", temperature: float = 0.07) -> None:
        self.k = k
        self.metric = metric
        self.temperature = temperature

    def fit(self, X: Any, y: Any, *, num_classes: Optional[int] = None, **ignored: Any) -> "KNNHead":
        metric = _check_metric("knn", self.metric)
        if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)) or self.k < 1:
            raise ConfigError(f"head parameter k of knn must be an integer >= 1; got {self.k!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ConfigError(f"head parameter temperature of knn must be > 0; got {self.temperature!r}")
        X = _l2_normalize(_as_float32(X))
        self.labels_ = np.asarray(y, dtype=np.int64)
        self.classes_ = np.arange(_num_classes(self.labels_, num_classes))
        self.index_, self._resources = faiss_index(X, metric=metric)
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        queries = _l2_normalize(_as_float32(X))
        k = min(int(self.k), len(self.labels_))
        values, ids = self.index_.search(queries, k)
        if self.metric == "cosine":
            logits = values / self.temperature
        else:
            logits = -values / (2.0 * self.temperature)
        weights = np.exp(logits - logits.max(axis=1, keepdims=True))
        scores = np.zeros((len(queries), len(self.classes_)), dtype=np.float64)
        rows = np.repeat(np.arange(len(queries)), k)
        np.add.at(scores, (rows, self.labels_[ids.reshape(-1)]), weights.reshape(-1))
        return (scores / scores.sum(axis=1, keepdims=True)).astype(np.float32)

    def scorer(self) -> Scorer:
        """The vote as a module holding the normalised training embeddings
        (read back from the FAISS index, which stores them as given)."""
        bank = self.index_.reconstruct_n(0, self.index_.ntotal)
        return KNNScorer(
            torch.from_numpy(bank), torch.from_numpy(self.labels_), k=int(self.k), metric=self.metric,
            temperature=float(self.temperature), num_classes=len(self.classes_),
        )


# ---------------------------------------------------------------------------
# The fine-tuned network's own classifier.
# ---------------------------------------------------------------------------


@register_head("finetuned")
class FinetunedHead(AffineHead):
    """The fine-tuned network's own head: its linear classifier x W^T + b, trained end to end in stage one.

    The joint (end-to-end) baseline that Kang et al., "Decoupling
    Representation and Classifier for Long-Tailed Recognition" (ICLR 2020),
    Sec. 5, compare the decoupled heads with: stage one trains the backbone
    and its ``nn.Linear`` classifier together with the stage-one loss and
    sampler, and ``decouple extract`` stores that classifier (/classifier,
    :class:`decouple.features.Classifier`). This head trains nothing: its
    scores are the logits the network predicts with at test time, the plain
    logits for every loss (balanced softmax, logit adjustment and LDAM
    adjust only the training loss). It assumes the prior stage one trained
    it under (:mod:`decouple.stage_two.priors`): uniform when the stage-one
    loss balances the prior, else the stage-one sampler's; uniform for an
    untrained classifier (a frozen run). A file without /classifier is
    refused.
    """

    trainable = False

    def __init__(self) -> None:
        pass

    @staticmethod
    def _no_classifier(path: Any) -> FeatureFileError:
        return FeatureFileError(
            f"{path or '<in memory>'}: no /classifier; head finetuned scores with the fine-tuned network's own "
            f"classifier, which `decouple extract` writes when it fine-tuned (epochs > 0) and that classifier is "
            f"one affine map of the embeddings (extract again, or choose another head)"
        )

    def check_features(self, feature_set: Any) -> None:
        if getattr(feature_set, "classifier", None) is None:
            raise self._no_classifier(feature_set.path)

    @classmethod
    def check_file(cls, path: Any) -> None:
        if read_classifier(path) is None:
            raise cls._no_classifier(path)

    def fit(self, X: Any, y: Any, *, classifier: Any = None, num_classes: Optional[int] = None,
            **ignored: Any) -> "FinetunedHead":
        """Take ``classifier`` (a :class:`decouple.features.Classifier`, weight
        (C, D) and bias (C,)) as the head; ``X`` (N, D) and ``y`` only check
        its shape."""
        if classifier is None:
            raise ConfigError("head finetuned needs the fine-tuned network's classifier: "
                              "fit(X, y, classifier=...) with /classifier of the feature file")
        weight = _as_float32(classifier.weight)
        bias = _as_float32(classifier.bias)
        classes = _num_classes(np.asarray(y), num_classes)
        dim = np.shape(X)[1]
        if weight.shape != (classes, dim) or bias.shape != (classes,):
            raise ConfigError(f"head finetuned: the classifier must be weight ({classes}, {dim}) and bias "
                              f"({classes},) for these features; got {weight.shape} and {bias.shape}")
        LOSSES.check(classifier.loss, where="/classifier attribute loss")
        SAMPLERS.check(classifier.sampler, where="/classifier attribute sampler")
        self.coef_, self.intercept_ = weight, bias
        self.classes_ = np.arange(classes)
        self.loss_, self.sampler_ = classifier.loss, classifier.sampler
        self.sampler_params_ = dict(classifier.sampler_params)
        self.epochs_, self.trained_ = int(classifier.epochs), bool(classifier.trained)
        return self

    def selection_(self) -> Dict[str, Any]:
        """Nothing is chosen; records the stage-one run the classifier comes from."""
        return {"stage_one": {"loss": self.loss_, "sampler": self.sampler_, "trained": self.trained_}}

    def assumed_prior(self, loss, sampler, class_counts, *, sampler_params=None, total_epochs=1) -> AssumedPrior:
        """Stage one's prior, whatever the cell's (None) loss and sampler."""
        if not self.trained_:
            return AssumedPrior("uniform", log_uniform(len(class_counts)))
        return assumed_prior(self, self.loss_, self.sampler_, class_counts, sampler_params=self.sampler_params_,
                             total_epochs=max(self.epochs_, 1))
