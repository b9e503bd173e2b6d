"""The model file (decouple-model, version 1): everything that classifies an image.

One ``torch.save`` archive of plain containers, which
``torch.load(path, weights_only=True)`` reads with no pickle of any class::

    {"format": "decouple-model", "version": 1,
     "meta": "<JSON>",                  # below
     "backbone": {name: tensor},        # the fine-tuned timm backbone's state dict
     "scorer": {name: tensor}}          # the head's tensors (decouple.stage_two.scorers)

``meta`` holds ``class_names``; ``backbone`` (timm name, num_classes,
embedding_dim, weights_sha256, where the weights came from);
``preprocess`` (input_size, interpolation, mean, std, crop_pct,
crop_mode: timm's data config of the extraction run); ``scorer`` (name and
settings); ``temperature`` (value, how it was chosen); ``method`` (head,
loss, sampler, seed, params); ``metrics`` (per split, as the cell scored
them on the cached features); ``selection`` (how this cell was chosen);
``provenance`` (feature file and its sha256, the extraction config,
package versions, time).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Union

import torch

from decouple.atomic import atomic_path
from decouple.errors import DecoupleError
from decouple.provenance import jsonable

FORMAT = "decouple-model"
VERSION = 1
#: Keys every model file's meta holds.
META_KEYS = ("class_names", "backbone", "preprocess", "scorer", "temperature", "method", "metrics", "selection",
             "provenance")

PathLike = Union[str, Path]


class ModelFileError(DecoupleError):
    """A model file that is missing, unreadable or not what it must be."""


@dataclass
class ModelFile:
    """The contents of a model file: ``meta`` (JSON) and two state dicts."""

    meta: Dict[str, Any]
    backbone: Dict[str, torch.Tensor]
    scorer: Dict[str, torch.Tensor]

    @property
    def class_names(self):
        return list(self.meta["class_names"])


def write_model_file(path: PathLike, model_file: ModelFile) -> Path:
    """Write ``model_file`` to ``path`` atomically (a temporary file renamed at the end)."""
    check_meta(path, model_file.meta)
    archive = {
        "format": FORMAT,
        "version": VERSION,
        "meta": json.dumps(jsonable(model_file.meta), sort_keys=True, allow_nan=False),
        "backbone": {key: value.detach().cpu().contiguous() for key, value in model_file.backbone.items()},
        "scorer": {key: value.detach().cpu().contiguous() for key, value in model_file.scorer.items()},
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(archive, tmp)
    return path


def read_model_file(path: PathLike) -> ModelFile:
    """Read and check a model file; any problem is a one-line ModelFileError."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        archive = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load fails in many ways on a file that is not its own
        raise ModelFileError(
            f"{path}: not a decouple model file (torch.load(weights_only=True) cannot read it: "
            f"{type(exc).__name__})"
        ) from None
    if not isinstance(archive, Mapping) or archive.get("format") != FORMAT:
        found = archive.get("format") if isinstance(archive, Mapping) else type(archive).__name__
        raise ModelFileError(f"{path}: not a decouple model file (format must be {FORMAT!r}; got {found!r})")
    if archive.get("version") != VERSION:
        raise ModelFileError(f"{path}: model file version must be {VERSION}; got {archive.get('version')!r}")
    try:
        meta = json.loads(archive["meta"])
    except (KeyError, TypeError, ValueError):
        raise ModelFileError(f"{path}: model file field meta must be a JSON object") from None
    check_meta(path, meta)
    for field in ("backbone", "scorer"):
        tensors = archive.get(field)
        if not isinstance(tensors, Mapping) or not all(isinstance(value, torch.Tensor) for value in tensors.values()):
            raise ModelFileError(f"{path}: model file field {field} must map names to tensors")
    return ModelFile(meta=meta, backbone=dict(archive["backbone"]), scorer=dict(archive["scorer"]))


def check_meta(path: PathLike, meta: Any) -> None:
    """Every key of META_KEYS present, class names a non-empty list of strings."""
    if not isinstance(meta, Mapping):
        raise ModelFileError(f"{path}: model file field meta must be a JSON object")
    missing = [key for key in META_KEYS if key not in meta]
    if missing:
        raise ModelFileError(f"{path}: model file meta lacks {', '.join(missing)}")
    names = meta["class_names"]
    if not isinstance(names, list) or not names or not all(isinstance(name, str) for name in names):
        raise ModelFileError(f"{path}: model file meta.class_names must be a non-empty list of strings")
