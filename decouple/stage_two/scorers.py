"""Each head's class scores as a torch module on embeddings, for the model file.

A fitted head (:mod:`decouple.stage_two.heads`) gives its scorer with
``head.scorer()``: an ``nn.Module`` mapping embeddings (B, D) to the same
class scores (B, C) as ``head.decision_function``, in plain torch ops (no
FAISS, no numpy), so that a model file runs anywhere and traces to
TorchScript. A scorer is saved as its registered name, its tensors
(``state_dict``) and its settings (:meth:`Scorer.settings`), and rebuilt
with :func:`rebuild_scorer`; a new kind of head registers a scorer here.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from decouple.errors import ConfigError
from decouple.registry import Registry

SCORERS = Registry("scorer")
register_scorer = SCORERS.register


class Scorer(nn.Module):
    """Base of the scorers: tensors are buffers named as the constructor's
    arguments, and :meth:`settings` returns the other (JSON) arguments."""

    def settings(self) -> Dict[str, Any]:
        """Constructor arguments that are not tensors."""
        return {}

    @classmethod
    def registered_name(cls) -> str:
        for name in SCORERS:
            if SCORERS.get(name) is cls:
                return name
        raise ConfigError(f"scorer {cls.__name__} is not registered")


def rebuild_scorer(name: str, tensors: Mapping[str, torch.Tensor], settings: Mapping[str, Any]) -> Scorer:
    """The scorer registered as ``name`` from its saved tensors and settings."""
    return SCORERS.get(name)(**dict(tensors), **dict(settings))


@register_scorer("linear")
class LinearScorer(Scorer):
    """x W^T + b (linear, tau_norm and lws, whose post-hoc steps fold into W and b)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", torch.as_tensor(weight, dtype=torch.float32))
        self.register_buffer("bias", torch.as_tensor(bias, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight, self.bias)


@register_scorer("cosine")
class CosineScorer(Scorer):
    """s cos((x - mean) * scale, w_c): the cosine head on standardised features."""

    def __init__(self, mean: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, logit_scale: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))
        self.register_buffer("weight", torch.as_tensor(weight, dtype=torch.float32))
        self.logit_scale = float(logit_scale)

    def settings(self) -> Dict[str, Any]:
        return {"logit_scale": self.logit_scale}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        standardized = F.normalize((x.float() - self.mean) * self.scale, dim=1, eps=1e-12)
        return self.logit_scale * F.linear(standardized, self.weight)


@register_scorer("disalign")
class DisAlignScorer(Scorer):
    """DisAlign's aligned logits on the standardised embedding x = (e - mean) * scale:
    (1 + sigma(v.x + b_v) * alpha) * (W x + b) + sigma(v.x + b_v) * beta,
    as :class:`~decouple.stage_two.heads.DisAlignHead`."""

    def __init__(self, mean: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 confidence_weight: torch.Tensor, confidence_bias: torch.Tensor, alpha: torch.Tensor,
                 beta: torch.Tensor) -> None:
        super().__init__()
        tensors = {"mean": mean, "scale": scale, "weight": weight, "bias": bias,
                   "confidence_weight": confidence_weight, "confidence_bias": confidence_bias,
                   "alpha": alpha, "beta": beta}
        for name, value in tensors.items():
            self.register_buffer(name, torch.as_tensor(value, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        standardized = (x.float() - self.mean) * self.scale
        logits = F.linear(standardized, self.weight, self.bias)
        confidence = torch.sigmoid(F.linear(standardized, self.confidence_weight[None, :], self.confidence_bias))
        return (1.0 + confidence * self.alpha) * logits + confidence * self.beta


@register_scorer("ncm")
class NCMScorer(Scorer):
    """Nearest class mean of the L2-normalised embedding: cosine to the
    (normalised) means, or minus the squared L2 distance to them."""

    def __init__(self, means: torch.Tensor, metric: str = "cosine") -> None:
        super().__init__()
        self.register_buffer("means", torch.as_tensor(means, dtype=torch.float32))
        self.metric = str(metric)

    def settings(self) -> Dict[str, Any]:
        return {"metric": self.metric}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        queries = F.normalize(x.float(), dim=1, eps=1e-12)
        similarity = F.linear(queries, self.means)
        if self.metric == "cosine":
            return similarity
        squared = queries.pow(2).sum(dim=1, keepdim=True) + self.means.pow(2).sum(dim=1)
        return 2.0 * similarity - squared


@register_scorer("knn")
class KNNScorer(Scorer):
    """Similarity-weighted votes of the k nearest training embeddings
    (``bank``: L2-normalised, one row per training image; ``labels`` theirs),
    normalised to sum to 1, as :class:`~decouple.stage_two.heads.KNNHead`."""

    def __init__(
        self, bank: torch.Tensor, labels: torch.Tensor, k: int, metric: str, temperature: float, num_classes: int
    ) -> None:
        super().__init__()
        self.register_buffer("bank", torch.as_tensor(bank, dtype=torch.float32))
        self.register_buffer("labels", torch.as_tensor(labels, dtype=torch.int64))
        self.k = min(int(k), len(self.labels))
        self.metric = str(metric)
        self.temperature = float(temperature)
        self.num_classes = int(num_classes)

    def settings(self) -> Dict[str, Any]:
        return {"k": self.k, "metric": self.metric, "temperature": self.temperature, "num_classes": self.num_classes}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        queries = F.normalize(x.float(), dim=1, eps=1e-12)
        similarity, ids = F.linear(queries, self.bank).topk(self.k, dim=1)
        if self.metric == "cosine":
            logits = similarity / self.temperature
        else:  # squared distance between unit vectors: 2 - 2 cos
            logits = -(2.0 - 2.0 * similarity) / (2.0 * self.temperature)
        weights = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
        scores = weights.new_zeros((weights.shape[0], self.num_classes))  # shape[0]: traced as dynamic
        scores.scatter_add_(1, self.labels[ids], weights)
        return scores / scores.sum(dim=1, keepdim=True)
