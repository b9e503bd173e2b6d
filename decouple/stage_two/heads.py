"""Classifier heads on cached features (a registry), scikit-learn style.

``head = create_head("tau_norm")``, then ``head.fit(X, y, X_val=..., y_val=...,
loss="ce")`` and ``head.decision_function(X_test)`` (N, C) or
``head.predict(X_test)`` (N,). ``__init__`` only stores parameters; learned
attributes end in ``_``. ``X`` is (N, D) float features, ``y`` (N,) int labels.

Two kinds of head:

* **trainable** (``trainable = True``: linear, cosine, tau_norm, lws) are
  trained by gradient descent with a long-tailed loss and a re-sampler.
  Their weights come from the fused trainer of :mod:`decouple.stage_two.fit`,
  which :func:`decouple.stage_two.fit.fit_cells` shares between heads: tau_norm
  and lws start from the linear head trained with the same loss, sampler and
  seed.
* **training-free** (ncm, knn) take no loss or sampler and search a FAISS
  index (on the GPU when FAISS sees one).

Gradient heads work in the standardised feature space of
:class:`decouple.stage_two.fit.PreparedData` (every feature centred and scaled
to the same spread with train statistics, row RMS norm 10) and expose
``coef_`` (C, D) and ``intercept_`` (C,) in the original feature space where
the head is linear in the features (``mean_`` and ``scale_`` hold the
standardisation).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from decouple.errors import ConfigError
from decouple.registry import Registry

HEADS = Registry("head")
register_head = HEADS.register

# Sampler constructor arguments that stage two sets itself, not the user.
_SAMPLER_HOUSEKEEPING = {"labels", "total_epochs", "seed", "num_samples", "num_classes"}


def create_head(name: str, **params: Any) -> "Head":
    """Build the head registered as ``name``; unknown names and keywords are errors."""
    return HEADS.create(name, where="", **params)


def list_heads() -> List[Tuple[str, str]]:
    """(name, one-line description) of every registered head."""
    return HEADS.describe()


def _as_float32(X: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(X, dtype=np.float32))


def _l2_normalize(X: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norms, 1e-12)


class Head:
    """Base of every head: the scikit-learn estimator contract."""

    #: Whether the head is trained with a loss and a sampler.
    trainable: bool = False

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


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return value


# ---------------------------------------------------------------------------
# Trainable heads.
# ---------------------------------------------------------------------------


class TrainableHead(Head):
    """A head trained by the fused trainer of :mod:`decouple.stage_two.fit`."""

    trainable = True
    #: Which weights it trains: "linear" (x W + b) or "cosine".
    family: str = "linear"

    # -- what the fused trainer needs to know ------------------------------

    def weight_family(self) -> Tuple:
        """Key of the weights this head trains; heads with equal keys can fuse."""
        return (self.family,)

    def training_loss_params(self, loss: str, given: Mapping[str, Any]) -> Dict[str, Any]:
        """Loss settings used to train the weights: ``given`` over the loss's
        defaults for this head's family and for a head on fixed features
        (LDAM's scale s and re-weighting start, see
        :func:`decouple.stage_two.losses.family_settings`)."""
        from decouple.stage_two.losses import family_settings

        return family_settings(loss, self.family, dict(given), fixed_features=True)

    def training_logit_scale(self, loss_module: Any) -> float:
        """Logit scale of the cosine family for this loss (1 for linear heads)."""
        return 1.0

    def check_settings(
        self,
        loss: str,
        sampler: str,
        settings: Mapping[str, Mapping[str, Any]],
        *,
        class_counts: np.ndarray,
        train: Any,
    ) -> None:
        """Build the loss and sampler once so bad settings fail before training."""
        from decouple.stage_two.losses import create_loss
        from decouple.stage_two.samplers import create_sampler

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
        train: Any = None,
        num_classes: Optional[int] = None,
    ) -> "TrainableHead":
        """Train on ``X`` (N, D), ``y`` (N,) with ``loss`` and ``sampler``;
        the epoch (and tau) are chosen on ``X_val``, ``y_val`` when given."""
        from decouple.stage_two.losses import create_loss
        from decouple.stage_two.samplers import create_sampler
        from decouple.stage_two.fit import PreparedData, TrainConfig, train_heads

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
            data,
            [loss_module],
            sampler=sampler_object,
            family=self.family,
            logit_scales=[self.training_logit_scale(loss_module)],
            seed=seed,
            train=train,
        )[0]
        return self.fit_from_weights(
            trained,
            data,
            loss=loss,
            sampler=sampler,
            loss_params=loss_params,
            sampler_params=sampler_params,
            seed=seed,
            train=train,
        )

    def fit_from_weights(
        self,
        trained: Any,
        data: Any,
        *,
        loss: str,
        sampler: str,
        loss_params: Mapping[str, Any],
        sampler_params: Mapping[str, Any],
        seed: int,
        train: Any,
    ) -> "TrainableHead":
        """Finish fitting from weights the fused trainer produced (a TrainedWeights)."""
        from decouple.stage_two.losses import LOSSES
        from decouple.stage_two.samplers import SAMPLERS

        resolved_loss = {k: v for k, v in LOSSES.parameters(loss).items() if k != "class_counts"}
        resolved_loss.update(self.training_loss_params(loss, loss_params))
        resolved_sampler = {
            k: v for k, v in SAMPLERS.parameters(sampler).items() if k not in _SAMPLER_HOUSEKEEPING
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
        self._finish(trained, data, seed=seed, train=train)
        return self

    def _finish(self, trained: Any, data: Any, *, seed: int, train: Any) -> None:
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

    def decision_function(self, X: Any) -> np.ndarray:
        return _as_float32(X) @ self.coef_.T + self.intercept_

    def selection_(self) -> Dict[str, Any]:
        return {"epoch": self.epoch_, "selected_on": self.selected_on_}


@register_head("linear")
class LinearHead(TrainableHead):
    """Linear classifier W x + b, trained with the cell's loss and sampler.

    The classifier-retraining baseline (cRT) of Kang et al., "Decoupling
    Representation and Classifier for Long-Tailed Recognition" (ICLR 2020),
    when trained class-balanced. Like every head of the linear family
    (linear, tau_norm, lws), it trains losses with their linear-family
    settings (``decouple list losses``; LDAM's scale s).
    """

    def __init__(self) -> None:
        pass

    def _finish(self, trained: Any, data: Any, *, seed: int, train: Any) -> None:
        self._set_linear(trained.weight.cpu().numpy(), trained.bias.cpu().numpy())


@register_head("cosine")
class CosineHead(TrainableHead):
    """Cosine classifier s * cos(x, w_c), no bias.

    Normalised-weight classifier as used with LDAM by Cao et al. (NeurIPS
    2019) and analysed by Kang et al. (ICLR 2020). ``scale`` s (16) sets the
    softmax temperature; a loss with its own scale (ldam's s) replaces it.
    x is the standardised feature (centred, every feature scaled to the same
    spread; :class:`decouple.stage_two.fit.PreparedData`), the decoupled
    counterpart of the batch-normalised embedding a network would feed it:
    the raw pooled features of a ReLU network all lie in one narrow cone,
    where cosines barely separate the classes.
    """

    family = "cosine"

    def __init__(self, scale: float = 16.0) -> None:
        self.scale = scale

    def weight_family(self) -> Tuple:
        return (self.family, float(self.scale))

    def training_logit_scale(self, loss_module: Any) -> float:
        if not (isinstance(self.scale, (int, float)) and self.scale > 0):
            raise ConfigError(f"head parameter scale of cosine must be > 0; got {self.scale!r}")
        # LDAM scales its logits by s itself (Cao et al. apply it to raw cosines).
        return 1.0 if loss_module.applies_own_scale else float(self.scale)

    def _finish(self, trained: Any, data: Any, *, seed: int, train: Any) -> None:
        self.coef_ = trained.weight.cpu().numpy().astype(np.float32)  # unit rows
        self.logit_scale_ = float(trained.logit_scale)
        self.classes_ = np.arange(self.coef_.shape[0])

    def decision_function(self, X: Any) -> np.ndarray:
        standardized = (_as_float32(X) - self.mean_) * self.scale_
        return self.logit_scale_ * (_l2_normalize(standardized) @ self.coef_.T)


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
    ..., 2); without val, tau = 1.
    """

    def __init__(self, taus: Sequence[float] = DEFAULT_TAUS) -> None:
        self.taus = taus

    def _finish(self, trained: Any, data: Any, *, seed: int, train: Any) -> None:
        import torch

        try:
            taus = [float(tau) for tau in self.taus]
        except (TypeError, ValueError):
            taus = []
        if not taus or not all(np.isfinite(taus)):
            raise ConfigError(
                f"head parameter taus of tau_norm must be a non-empty list of numbers; got {self.taus!r}"
            )
        weight = trained.weight
        norms = weight.norm(dim=1).clamp_min(1e-12)
        if data.x_val is not None:
            from decouple.stage_two.fit import mean_class_score

            with torch.no_grad():
                stacked = torch.cat([weight / norms[:, None] ** tau for tau in taus])  # (T * C, D)
                logits = data.x_val @ stacked.t()
                predictions = logits.view(len(data.x_val), len(taus), -1).argmax(dim=2)
                scores = mean_class_score(predictions, data.y_val, data.num_classes).cpu().numpy()
            best = int(np.argmax(scores))
            self.tau_ = taus[best]
            self.tau_scores_ = [float(score) for score in scores]
            self.tau_selected_on_ = "val"
        else:
            self.tau_ = 1.0
            self.tau_scores_ = []
            self.tau_selected_on_ = "default"
        normalized = (weight / norms[:, None] ** self.tau_).cpu().numpy()
        self._set_linear(normalized, None)

    def selection_(self) -> Dict[str, Any]:
        return {"epoch": self.epoch_, "tau": self.tau_, "selected_on": self.selected_on_}


@register_head("lws")
class LWSHead(TrainableHead):
    """Learnable weight scaling: per-class scales on a frozen linear head, trained class-balanced.

    Kang et al., "Decoupling Representation and Classifier for Long-Tailed
    Recognition" (ICLR 2020), Sec. 4: logits f_c = s_c * w_c^T x with w
    frozen and s learned by cross-entropy under class-balanced sampling.
    Here the bias is relearned with the scales (``learn_bias``), since a
    frozen bias would keep the head-class prior that the scales undo. The
    linear head itself is trained with the cell's loss and sampler; the
    scales use ``epochs`` (default: the training epochs) chosen on val.
    """

    def __init__(self, learn_bias: bool = True, epochs: Optional[int] = None) -> None:
        self.learn_bias = learn_bias
        self.epochs = epochs

    def _finish(self, trained: Any, data: Any, *, seed: int, train: Any) -> None:
        import torch

        from decouple.stage_two.samplers import create_sampler
        from decouple.stage_two.fit import cpu_threads_for, make_optimizer

        epochs = int(self.epochs if self.epochs is not None else train.epochs)
        if epochs < 1:
            raise ConfigError(f"head parameter epochs of lws must be >= 1; got {self.epochs!r}")
        weight = trained.weight
        with torch.no_grad():
            z_train = data.x @ weight.t()  # (N, C) frozen logits without bias
            z_val = None if data.x_val is None else data.x_val @ weight.t()
        scales = torch.ones(data.num_classes, device=weight.device, requires_grad=True)
        bias = trained.bias.detach().clone().requires_grad_(bool(self.learn_bias))
        parameters = [scales] + ([bias] if self.learn_bias else [])
        optimizer = make_optimizer([{"params": parameters, "weight_decay": 0.0}], train)
        sampler = create_sampler(
            "class_balanced", data.y.cpu().numpy(), total_epochs=epochs, seed=seed
        )
        with cpu_threads_for(data.device, train.batch_size * data.num_classes):
            chooser, best_scales, best_bias = self._train_scales(
                z_train, z_val, scales, bias, optimizer, sampler, data, epochs, train
            )
        self.scale_epoch_ = chooser.epochs[0]
        self.scales_ = best_scales.cpu().numpy()
        self.scale_history_ = chooser.histories[0]
        self._set_linear(
            (weight * best_scales[:, None]).detach().cpu().numpy(), best_bias.cpu().numpy()
        )

    @staticmethod
    def _train_scales(z_train, z_val, scales, bias, optimizer, sampler, data, epochs, train) -> Tuple:
        """Minimise class-balanced cross-entropy over the scales (and bias);
        returns (EpochChooser, scales, bias), the epoch chosen on val as in the
        fused trainer (the last epoch without val)."""
        import math

        import torch

        from decouple.stage_two.fit import EpochChooser, is_checkpoint, mean_class_score

        steps = epochs * -(-len(data.y) // train.batch_size)
        step = 0
        chooser = EpochChooser(1, epochs)
        chosen = (scales.detach().clone(), bias.detach().clone())
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            order = sampler.epoch_indices().to(z_train.device)
            for start in range(0, len(order), train.batch_size):
                batch = order[start : start + train.batch_size]
                for group in optimizer.param_groups:
                    group["lr"] = 0.5 * train.lr * (1.0 + math.cos(math.pi * step / steps))
                logits = z_train.index_select(0, batch) * scales + bias
                loss = torch.nn.functional.cross_entropy(logits, data.y.index_select(0, batch))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
            if z_val is None or not is_checkpoint(epoch, epochs):
                continue
            with torch.no_grad():
                predictions = (z_val * scales + bias).argmax(dim=1, keepdim=True)
                score, error = mean_class_score(predictions, data.y_val, data.num_classes, with_error=True)
            if chooser.update(epoch, score.tolist(), error.tolist()):
                chosen = (scales.detach().clone(), bias.detach().clone())
        if z_val is None:  # the last epoch
            chosen = (scales.detach().clone(), bias.detach().clone())
        return (chooser,) + chosen

    def selection_(self) -> Dict[str, Any]:
        return {"epoch": self.epoch_, "scale_epoch": self.scale_epoch_, "selected_on": self.selected_on_}


# ---------------------------------------------------------------------------
# Training-free heads (FAISS).
# ---------------------------------------------------------------------------

METRICS = ("cosine", "l2")


def faiss_index(vectors: np.ndarray, *, metric: str):
    """A flat FAISS index over ``vectors`` (M, D): inner product for "cosine"
    (rows are expected L2-normalised), squared L2 for "l2"; moved to the GPU
    when FAISS sees one. Returns (index, gpu_resources or None)."""
    import faiss

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


@register_head("ncm")
class NCMHead(SearchHead):
    """Nearest class mean of L2-normalised features, by cosine or L2, via FAISS.

    The training-free baseline of Kang et al. (ICLR 2020), Sec. 4: every
    class is the mean of its L2-normalised training features; a query goes
    to the nearest mean. ``metric`` "cosine" (default) normalises the means
    too and scores by cosine similarity; "l2" scores by minus the squared
    Euclidean distance to the (unnormalised) means.
    """

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
        self.index_, self._resources = faiss_index(means, metric=metric)
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        queries = _l2_normalize(_as_float32(X))
        num_classes = len(self.means_)
        values, ids = self.index_.search(queries, num_classes)
        if self.metric == "l2":
            values = -values
        scores = np.full((len(queries), num_classes), -np.inf, dtype=np.float32)
        np.put_along_axis(scores, ids, values, axis=1)
        return scores


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
