"""The deployed classifier: a fine-tuned backbone, the chosen head and its
temperature in one ``nn.Module`` (:class:`DecoupleModel`), and
:func:`load_model`, which rebuilds it from a model file with no network."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from decouple.deploy.model_file import ModelFile, ModelFileError, PathLike, read_model_file
from decouple.errors import DecoupleError
from decouple.stage_one.backbones import create_backbone, embed
from decouple.stage_one.finetune import make_transform
from decouple.stage_two.scorers import rebuild_scorer


class DecoupleModel(nn.Module):
    """Preprocessed images (B, 3, H, W) -> calibrated logits (B, C).

    ``forward`` is the head's scores on the backbone's pre-logit embedding
    divided by the temperature fitted on val (Guo et al., ICML 2017), so
    ``softmax(model(x))`` are calibrated probabilities and the argmax is the
    head's prediction. ``transform()`` is the preprocessing of the
    extraction run (PIL image -> tensor); ``class_names[i]`` names logit i.
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
        self.class_names: List[str] = list(class_names)
        self.preprocess: Dict[str, Any] = dict(preprocess)
        self.meta: Dict[str, Any] = dict(meta or {})

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's pre-logit embeddings (B, D), as stage one cached them."""
        return embed(self.backbone, images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.scorer(self.embed(images)) / self.temperature

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
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelFileError(f"{source}: the backbone cannot be rebuilt ({reason})") from None
    scorer_meta = meta["scorer"]
    try:
        scorer = rebuild_scorer(str(scorer_meta["name"]), model_file.scorer, scorer_meta.get("settings", {}))
    except (DecoupleError, TypeError, KeyError) as exc:
        raise ModelFileError(f"{source}: the head cannot be rebuilt ({exc})") from None
    model = DecoupleModel(
        backbone,
        scorer,
        temperature=float(meta["temperature"]["value"]),
        class_names=meta["class_names"],
        preprocess=meta["preprocess"],
        meta=meta,
    )
    return model.eval()


def load_model(path: PathLike, *, device: Union[str, torch.device] = "cpu") -> DecoupleModel:
    """The classifier saved by ``decouple save-model`` (or ``head --save-model``),
    in eval mode on ``device``. Reads with ``torch.load(weights_only=True)``;
    needs neither timm's hub nor the internet."""
    return model_from_file(read_model_file(path), source=str(path)).to(device)
