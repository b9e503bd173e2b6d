"""Writing a fitted cell as a model: the decouple model file, or a portable
export of the same classifier (:mod:`decouple.deploy.portable`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from decouple.deploy.build import build_model_file, find_backbone
from decouple.deploy.model import model_from_file
from decouple.deploy.model_file import ModelFile, PathLike, write_model_file
from decouple.deploy.portable import EXPORTS, export_portable
from decouple.errors import ConfigError, DecoupleError
from decouple.features import read_features
from decouple.stage_two.cells import Cell, CellResult, validate_cell
from decouple.stage_two.config import TrainConfig
from decouple.stage_two.fit import fit_cell
from decouple.stage_two.heads import HEADS, Head

#: ``decouple`` (the model file that ``decouple predict`` reads) or a portable format.
MODEL_FORMATS = ("decouple",) + tuple(EXPORTS)


@dataclass
class SavedModel:
    """What was written: the file, its format and the model file's meta."""

    path: Path
    format: str
    meta: Dict[str, Any]

    def describe(self) -> str:
        """Lines a person reads: the method, how it was chosen, its scores, where its weights came from."""
        method = self.meta["method"]
        name = " / ".join(str(part) for part in (method["head"], method["loss"], method["sampler"]) if part)
        selection = self.meta["selection"]
        if selection.get("by") == "sweep":
            how = (f"the best of {selection['methods_compared']} methods by {selection['split']} "
                   f"{selection['metric']} ({100 * selection['method_mean']:.1f} mean over "
                   f"{selection['method_seeds']} seed(s); this seed {100 * selection['value']:.1f})")
        else:
            how = "as given"
        lines = [f"wrote {self.path} ({self.format}): {name}, seed {method['seed']}, {how}"]
        scores = ", ".join(
            f"{split} top-1 {100 * values['top1']:.1f}%" for split, values in self.meta["metrics"].items()
            if values.get("top1") is not None
        )
        temperature = self.meta["temperature"]
        lines.append(f"  scores on the cached features: {scores}; temperature {temperature['value']:.3g} "
                     f"(fitted on {temperature['selected_on']})")
        lines.append(f"  backbone {self.meta['backbone']['name']}: {self.meta['backbone']['weights_source']}")
        return "\n".join(lines)


def check_format(format: str) -> str:
    """``format`` if it is one of MODEL_FORMATS, else a DecoupleError listing them."""
    if format not in MODEL_FORMATS:
        raise DecoupleError(f"--format must be one of {', '.join(MODEL_FORMATS)}; got {format!r}")
    return format


def write_model(model_file: ModelFile, path: PathLike, *, format: str = "decouple") -> Path:
    """Write ``model_file`` as a decouple model file or a portable export (atomically)."""
    if check_format(format) == "decouple":
        return write_model_file(path, model_file)
    return export_portable(model_from_file(model_file), path, format=format)


def save_cell(
    feature_set,
    result: CellResult,
    path: PathLike,
    *,
    selection: Optional[Mapping[str, Any]] = None,
    backbone_weights: Optional[PathLike] = None,
    backbone: Optional[Tuple[Any, str, Dict[str, Any]]] = None,
    features_sha256: Optional[str] = None,
    format: str = "decouple",
) -> SavedModel:
    """Save a cell fitted with ``keep_head`` on ``feature_set`` as a model
    (``backbone``: :func:`~decouple.deploy.build.find_backbone`'s answer, and
    ``features_sha256`` the feature file's, if known)."""
    check_format(format)
    model_file = build_model_file(
        feature_set, result, selection=selection or {"by": "given"}, backbone_weights=backbone_weights,
        backbone=backbone, features_sha256=features_sha256,
    )
    written = write_model(model_file, path, format=format)
    return SavedModel(path=written, format=format, meta=model_file.meta)


def fit_head_file(
    path: PathLike,
    cell: Cell,
    *,
    train: TrainConfig = TrainConfig(),
    save_to: Optional[PathLike] = None,
    backbone_weights: Optional[PathLike] = None,
    target_prior: Optional[str] = None,
) -> Tuple[CellResult, Optional[SavedModel]]:
    """``decouple head``: fit one cell on the feature file at ``path`` and score
    it; with ``save_to``, save it as a model. Names and settings are checked
    before the file is read, and the backbone is found before the fit, so a
    typo or a missing checkpoint fails at once. ``target_prior``: score
    every split under that prior (:func:`~decouple.stage_two.fit.fit_cells`)."""
    cell = validate_cell(cell)
    train = train.validated()
    if save_to is not None and HEADS.get(cell.head).scorer is Head.scorer:
        raise ConfigError(f"head {cell.head!r} cannot be saved as a model: it defines no scorer()")
    feature_set = read_features(path)
    backbone = find_backbone(feature_set, weights=backbone_weights) if save_to is not None else None
    result = fit_cell(feature_set, cell, train=train, keep_head=save_to is not None, target_prior=target_prior)
    saved = None
    if save_to is not None:
        saved = save_cell(feature_set, result, save_to, backbone=backbone)
    return result, saved
