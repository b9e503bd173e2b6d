"""The deployed classifier: a fine-tuned backbone, the chosen head and its
temperature in one ``nn.Module`` (:class:`DecoupleModel`), and
:func:`load_model`, which rebuilds it from a model file with no network."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from decouple.deploy.model_file import ModelFile, ModelFileError, PathLike, read_model_file
from decouple.errors import DecoupleError, first_line
from decouple.stage_one.backbones import create_backbone, embed
from decouple.stage_one.finetune import make_transform
from decouple.stage_two.priors import target_log_prior
from decouple.stage_two.scorers import rebuild_scorer


class DecoupleModel(nn.Module):
    """Preprocessed images (B, 3, H, W) -> calibrated logits (B, C).

    ``forward`` is the head's scores on the backbone's pre-logit embedding
    divided by the temperature fitted on val (Guo et al., ICML 2017), so
    ``softmax(model(x))`` are calibrated probabilities and the argmax is the
    head's prediction. ``transform()`` is the preprocessing of the
    extraction run (PIL image -> tensor); ``class_names[i]`` names logit i.
    :meth:`set_target_prior` moves the scores to the class prior the model
    is deployed under (:mod:`decouple.stage_two.priors`).
    """

    def __init__(
        self,
        backbone: nn.Module,
        scorer: nn.Module,
        *,
        temperature: float,
        class_names: Sequence[str],
        preprocess: Mapping[str, Any],
        meta: Optional[Mapping[str, Any]] = None,
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise DecoupleError(f"temperature must be > 0; got {temperature!r}")
        self.backbone = backbone
        self.scorer = scorer
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        # log pi_target - log pi_assumed (C,), None for the prior the head assumes.
        self.register_buffer("prior_shift", None)
        self.class_names: List[str] = list(class_names)
        self.preprocess: Dict[str, Any] = dict(preprocess)
        self.meta: Dict[str, Any] = dict(meta or {})

    def set_target_prior(self, target: Optional[str]) -> "DecoupleModel":
        """Score under class prior ``target``: "uniform", "train" (the
        training counts), a JSON / CSV file of class weights, or None for the
        prior the head assumes (the model file records it). Returns self."""
        if target is None:
            self.prior_shift = None
            return self
        prior = self.meta.get("prior")
        if not isinstance(prior, dict) or "log_assumed" not in prior:
            raise DecoupleError("this model file records no assumed prior (saved before decouple had priors); "
                                "save it again to use a target prior")
        log_target = target_log_prior(target, prior["train_counts"], self.class_names)
        shift = torch.tensor(log_target - np.asarray(prior["log_assumed"], dtype=np.float64), dtype=torch.float32)
        self.prior_shift = shift.to(self.temperature.device)
        return self

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's pre-logit embeddings (B, D), as stage one cached them."""
        return embed(self.backbone, images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        scores = self.scorer(self.embed(images))
        if self.prior_shift is not None:
            if self.meta["prior"].get("scores_are_probabilities"):  # Bayes' rule on probabilities (knn)
                scores = scores * torch.exp(self.prior_shift - self.prior_shift.max())
                scores = scores / scores.sum(dim=1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
            else:
                scores = scores + self.temperature * self.prior_shift
        return scores / self.temperature

    def transform(self) -> Callable:
        """PIL RGB image -> normalised tensor (3, H, W): the extraction run's
        evaluation transform (timm's, from the stored data config)."""
        return make_transform(self.preprocess, is_training=False)

    @property
    def input_size(self) -> List[int]:
        return [int(side) for side in self.preprocess["input_size"]]


def model_from_file(model_file: ModelFile, *, source: str = "<in memory>") -> DecoupleModel:
    """A :class:`DecoupleModel` in eval mode from a model file's contents."""
    meta = model_file.meta
    backbone_meta = meta["backbone"]
    try:
        backbone, _ = create_backbone(str(backbone_meta["name"]), num_classes=int(backbone_meta["num_classes"]))
        backbone.load_state_dict(model_file.backbone, strict=True)
    except (DecoupleError, RuntimeError, KeyError, TypeError) as exc:
        raise ModelFileError(f"{source}: the backbone cannot be rebuilt ({first_line(exc, 200)})") from None
    scorer_meta = meta["scorer"]
    try:
        scorer = rebuild_scorer(str(scorer_meta["name"]), model_file.scorer, scorer_meta.get("settings", {}))
    except (DecoupleError, TypeError, KeyError) as exc:
        raise ModelFileError(f"{source}: the head cannot be rebuilt ({exc})") from None
    temperature = meta["temperature"].get("value") if isinstance(meta["temperature"], dict) else None
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ModelFileError(f"{source}: model file meta.temperature.value must be a finite number > 0; got {temperature!r}")
    preprocess = meta["preprocess"]
    missing = [key for key in ("input_size", "mean", "std") if not isinstance(preprocess, dict) or key not in preprocess]
    if missing:
        raise ModelFileError(f"{source}: model file meta.preprocess lacks {', '.join(missing)}")
    model = DecoupleModel(
        backbone, scorer, temperature=float(temperature), class_names=meta["class_names"], preprocess=preprocess,
        meta=meta,
    ).eval()
    _check_runs(model, source)
    return model


def _check_runs(model: DecoupleModel, source: str) -> None:
    """One blank image through the model: it must give one score per class name."""
    try:
        with torch.no_grad():
            logits = model(torch.zeros(1, *model.input_size))
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ModelFileError(
            f"{source}: the model does not run on a {model.input_size} image ({first_line(exc)})"
        ) from None
    if tuple(logits.shape) != (1, len(model.class_names)):
        raise ModelFileError(
            f"{source}: the model gives {logits.shape[-1]} scores per image for {len(model.class_names)} class names"
        )


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """``device`` as a torch.device ("cuda" if available, else "cpu", when None); a
    device that does not exist here is a DecoupleError."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise DecoupleError(f"--device {device!r}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if resolved.type == "cuda" and (not torch.cuda.is_available() or (resolved.index or 0) >= torch.cuda.device_count()):
        raise DecoupleError(f"--device {device}: no such CUDA device here ({torch.cuda.device_count()} visible)")
    return resolved


def load_model(path: PathLike, *, device: Union[str, torch.device, None] = "cpu") -> DecoupleModel:
    """The classifier saved by ``decouple save-model`` (or ``head --save-model``),
    in eval mode on ``device`` (None: a GPU when there is one). Reads with
    ``torch.load(weights_only=True)``; needs neither timm's hub nor the internet."""
    resolved = resolve_device(device)
    return model_from_file(read_model_file(path), source=str(path)).to(resolved)
