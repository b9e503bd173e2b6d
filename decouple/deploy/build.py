"""From a fitted cell to a model file: the stage-one backbone found and
verified, the head as a scorer, the preprocessing, temperature, metrics and
provenance gathered into one :class:`~decouple.deploy.model_file.ModelFile`.

The backbone weights are those the feature file's embeddings came from,
recognised by their sha256 (the ``model_sha256`` that ``decouple extract``
records). They are looked for, in order: a file given by the user; the
run's checkpoint (``RUN.ckpt.pt`` beside the feature file, or the
``checkpoint`` of its config), which holds the weights of the last epoch;
for a frozen run (``--epochs 0``), the backbone rebuilt as extract built it
(same seed, ``--weights`` file or timm weights from the local cache).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from decouple import __version__
from decouple.deploy.model_file import ModelFile, PathLike
from decouple.errors import DecoupleError, first_line
from decouple.provenance import file_sha256, jsonable, package_versions, utc_now
from decouple.stage_one.backbones import create_backbone, embedding_dim, read_state_dict, state_dict_sha256
from decouple.stage_one.finetune import data_config_for, seed_everything
from decouple.stage_two.cells import CellResult

#: The keys of timm's data config a model file keeps as its preprocessing.
PREPROCESS_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def _run_config(feature_set) -> Dict[str, Any]:
    """The extraction config stored in the feature file, or a clear error."""
    text = feature_set.attrs.get("config")
    if not text:
        raise DecoupleError(
            f"{feature_set.path}: the feature file records no stage-one run (attribute config), so its backbone "
            f"cannot be rebuilt; only feature files written by `decouple extract` can become a model"
        )
    try:
        return json.loads(text)
    except ValueError:
        raise DecoupleError(f"{feature_set.path}: attribute config must be JSON") from None


def _checkpoint_candidates(feature_path: Path, config: Mapping[str, Any]) -> List[Path]:
    stem = feature_path.name[: -len(feature_path.suffix)] if feature_path.suffix else feature_path.name
    paths = [feature_path.with_name(f"{stem}.ckpt.pt")]
    if config.get("checkpoint"):
        paths.append(Path(config["checkpoint"]))
    return list(dict.fromkeys(paths))


def find_backbone(
    feature_set, *, weights: Optional[PathLike] = None
) -> Tuple[nn.Module, str, Dict[str, Any]]:
    """The backbone of ``feature_set``'s extraction run with its fine-tuned
    weights, a description of where they came from, and the run's config.

    Every candidate is checked against the recorded ``model_sha256``; none
    matching is a DecoupleError naming what was tried. A feature file that
    records no ``model_sha256`` takes the first candidate that fits, and the
    source says "unverified".
    """
    config = _run_config(feature_set)
    name = str(feature_set.backbone)
    num_classes = feature_set.num_classes
    expected = feature_set.attrs.get("model_sha256")
    model, _ = create_backbone(name, num_classes=num_classes)
    tried: List[str] = []

    def accept(state: Mapping[str, torch.Tensor], source: str) -> bool:
        if expected and state_dict_sha256(state) != expected:
            tried.append(f"{source} (different weights)")
            return False
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            tried.append(f"{source} ({first_line(exc, 80)})")
            return False
        return True

    unverified = "" if expected else " (unverified: the feature file records no model_sha256)"
    if weights is not None:
        if accept(read_state_dict(weights, option="--backbone-weights"), str(weights)):
            return model, str(weights) + unverified, config
        raise DecoupleError(
            f"--backbone-weights {weights}: not the weights the embeddings of {feature_set.path} came from "
            f"({tried[-1]})"
        )
    for path in _checkpoint_candidates(Path(feature_set.path), config):
        if not path.is_file():
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # an unreadable checkpoint is one more candidate tried
            tried.append(f"{path} (unreadable: {type(exc).__name__})")
            continue
        if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping) and accept(
            state["model"], f"checkpoint {path}"
        ):
            return model, f"checkpoint {path} (epoch {state.get('epoch')})" + unverified, config
    if int((config.get("finetune") or {}).get("epochs", -1)) == 0:
        rebuilt = _rebuild_frozen(name, num_classes, config, tried)
        if rebuilt is not None and accept(rebuilt.state_dict(), "the frozen backbone rebuilt"):
            return model, _frozen_source(config) + unverified, config
    listing = "; ".join(tried) or "no checkpoint beside the feature file"
    raise DecoupleError(
        f"{feature_set.path}: the backbone weights its embeddings came from were not found (tried: {listing}); "
        f"pass the fine-tuned weights with --backbone-weights FILE"
    )


def _rebuild_frozen(name: str, num_classes: int, config: Mapping[str, Any], tried: List[str]) -> Optional[nn.Module]:
    """A frozen run's backbone, built as ``decouple extract`` built it (same
    seed); the caller's random states are left as they were."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            seed_everything(int(config.get("seed", 0)), 0)
            model, _ = create_backbone(
                name, num_classes=num_classes, pretrained=bool(config.get("pretrained")), weights=config.get("weights")
            )
    except DecoupleError as exc:
        tried.append(f"the frozen backbone rebuilt ({exc})")
        return None
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return model


def _frozen_source(config: Mapping[str, Any]) -> str:
    if config.get("weights"):
        return f"frozen backbone, weights {config['weights']}"
    return "frozen backbone, timm pretrained weights" if config.get("pretrained") else "frozen backbone, seeded random"


def preprocess_of(model: nn.Module, feature_set, config: Mapping[str, Any]) -> Dict[str, Any]:
    """timm's data config of the extraction run (its input size), JSON-ready."""
    img_size = feature_set.attrs.get("img_size", config.get("img_size"))
    data_config = data_config_for(model, int(img_size))
    return {key: jsonable(data_config.get(key)) for key in PREPROCESS_KEYS}


def prior_meta(feature_set, result: CellResult) -> Dict[str, Any]:
    """What ``predict --target-prior`` needs (:mod:`decouple.stage_two.priors`):
    the prior the head assumes, as log probabilities, the training counts
    and whether its scores are probabilities (knn) or logits."""
    head = result.fitted_head
    sampler_params = (result.params.get("sampler") or {}) if head.trainable else None
    epochs = int((result.params.get("train") or {}).get("epochs") or 1)
    assumed = head.assumed_prior(result.loss, result.sampler, feature_set.train_counts,
                                 sampler_params=sampler_params, total_epochs=epochs)
    return {
        "assumed": assumed.name,
        "log_assumed": [float(value) for value in assumed.log_probabilities],
        "train_counts": [int(count) for count in feature_set.train_counts],
        "scores_are_probabilities": bool(head.scores_are_probabilities),
    }


def build_model_file(
    feature_set,
    result: CellResult,
    *,
    selection: Mapping[str, Any],
    backbone_weights: Optional[PathLike] = None,
    backbone: Optional[Tuple[nn.Module, str, Dict[str, Any]]] = None,
    features_sha256: Optional[str] = None,
) -> ModelFile:
    """The model file of ``result`` (fitted with ``keep_head``) on ``feature_set``;
    ``backbone``: what :func:`find_backbone` returned, if already found;
    ``features_sha256``: the feature file's, if already known (else hashed here)."""
    head = result.fitted_head
    if head is None:
        raise ValueError("the cell result holds no fitted head: fit it with keep_head=True")
    model, weights_source, config = backbone or find_backbone(feature_set, weights=backbone_weights)
    scorer = head.scorer()
    calibration = dict(result.params.get("calibration") or {"temperature": 1.0, "selected_on": "default"})
    meta = {
        "class_names": list(feature_set.class_names),
        "backbone": {
            "name": str(feature_set.backbone),
            "num_classes": feature_set.num_classes,
            "embedding_dim": embedding_dim(model),
            # find_backbone checked the weights against the recorded hash, where there is one
            "weights_sha256": feature_set.attrs.get("model_sha256") or state_dict_sha256(model.state_dict()),
            "weights_source": weights_source,
        },
        "preprocess": preprocess_of(model, feature_set, config),
        "scorer": {"name": type(scorer).registered_name(), "settings": scorer.settings()},
        "temperature": {
            "value": float(calibration.get("temperature", 1.0)),
            "selected_on": calibration.get("selected_on", "default"),
        },
        "prior": prior_meta(feature_set, result),
        "method": {
            "head": result.head, "loss": result.loss, "sampler": result.sampler, "seed": result.seed,
            "params": jsonable(result.params),
        },
        "metrics": jsonable(result.metrics),
        "selection": dict(selection),
        "provenance": {
            "features": str(feature_set.path),
            "features_sha256": features_sha256 or (file_sha256(feature_set.path) if feature_set.path else None),
            "feature_weights_sha256": feature_set.attrs.get("weights_sha256"),
            "extract_config": config,
            "extract_versions": json.loads(feature_set.attrs.get("versions") or "{}"),
            "versions": package_versions(),
            "decouple": __version__,
            "created_at": utc_now(),
        },
    }
    return ModelFile(meta=meta, backbone=model.state_dict(), scorer=scorer.state_dict())
