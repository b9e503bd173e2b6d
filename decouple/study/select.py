"""Choosing the cell of a sweep to deploy, on val alone, and refitting it.

The method (head, loss, sampler and the settings that tell cells apart, as
the export tables label them) with the best mean val score over its seeds
wins; of its seeds, the one with the best val score is deployed. Test is
never looked at. The database holds scores, not weights, so the chosen cell
is refitted from its recorded settings: on the CPU in float32 that gives
the same head bit for bit, which :func:`refit_record` checks against the
stored val scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from decouple.deploy.save import SavedModel, save_cell
from decouple.errors import DecoupleError
from decouple.features import FeatureSet, read_features
from decouple.provenance import file_sha256
from decouple.stage_two.cells import Cell, CellResult
from decouple.stage_two.config import TrainConfig
from decouple.stage_two.fit import fit_cell
from decouple.study.export import LOWER_IS_BETTER
from decouple.study.ranking import SELECTION_SPLITS, rank_methods, score_of, sweep_records
from decouple.study.store import CellRecord

__all__ = ["SELECTION_SPLITS", "cell_of", "refit_agrees", "refit_record", "save_best", "select_record"]


def select_record(
    db: str, *, features: Optional[str] = None, metric: str = "mean_class_acc", split: str = "val"
) -> Tuple[CellRecord, Dict[str, Any]]:
    """The val-best cell of the sweep in ``db`` and how it was chosen: of the
    best method (:func:`rank_methods`, the choice ``decouple recommend``
    names too), the seed with the best score."""
    ranking = rank_methods(sweep_records(db, features=features, metric=metric, split=split), metric=metric, split=split)
    best = ranking[0]
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    chosen = max(best.records, key=lambda record: sign * score_of(record, split, metric))
    selection = {
        "by": "sweep",
        "split": split,
        "metric": metric,
        "goal": "lowest" if sign < 0 else "highest",
        "method_mean": best.mean,
        "method_seeds": len(best.records),
        "value": score_of(chosen, split, metric),
        "methods_compared": len(ranking),
        "db": str(db),
        "cell_key": chosen.cell_key,
    }
    return chosen, selection


def cell_of(record: CellRecord) -> Cell:
    """The cell a record computed, with its recorded settings."""
    params: Dict[str, Dict[str, Any]] = {record.head: dict(record.params.get("head") or {})}
    for name, kind in ((record.loss, "loss"), (record.sampler, "sampler")):
        if name is not None:
            params.setdefault(name, {}).update(record.params.get(kind) or {})
    return Cell(head=record.head, loss=record.loss, sampler=record.sampler, seed=int(record.seed), params=params)


def refit_record(record: CellRecord, *, features_path: Optional[str] = None) -> Tuple[FeatureSet, CellResult]:
    """Refit a stored cell on its feature file (``features_path`` if it moved),
    keeping the head. The file must be the one the sweep used (same sha256)."""
    path = features_path or record.features
    if not Path(path).is_file():
        raise DecoupleError(
            f"{path}: feature file of the chosen cell not found (paths are as the sweep config gave them); "
            f"run from the sweep's folder or pass --features-file"
        )
    if file_sha256(path) != record.features_sha256:
        raise DecoupleError(f"{path}: not the feature file the sweep scored (its sha256 differs)")
    # The recorded settings, on the recorded device where this machine has it
    # (else the CPU: the same head up to the device's rounding; refit_agrees tells).
    fields = set(TrainConfig.__dataclass_fields__)
    settings = {key: value for key, value in record.train.items() if key in fields}
    device = str(settings.get("device") or "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        settings["device"] = "cpu"
    train = TrainConfig(**settings)
    feature_set = read_features(path)
    result = fit_cell(feature_set, cell_of(record), train=train, keep_head=True)
    return feature_set, result


def refit_agrees(record: CellRecord, result: CellResult, *, split: str = "val", metric: str = "mean_class_acc") -> bool:
    """Whether the refitted cell scores what the sweep recorded on ``split``."""
    stored = score_of(record, split, metric)
    again = result.metrics.get(split, {}).get(metric)
    return stored is None or (again is not None and abs(float(again) - stored) <= 1e-9)


def save_best(
    db: str,
    path: str,
    *,
    features: Optional[str] = None,
    metric: str = "mean_class_acc",
    split: str = "val",
    features_path: Optional[str] = None,
    backbone_weights: Optional[str] = None,
    format: str = "decouple",
) -> SavedModel:
    """Choose the val-best cell of ``db`` (:func:`select_record`), refit it and
    save it as a model; the file records the choice and whether the refit
    reproduced the stored val score (``selection.refit_matches``)."""
    record, selection = select_record(db, features=features, metric=metric, split=split)
    feature_set, result = refit_record(record, features_path=features_path)
    selection["refit_matches"] = refit_agrees(record, result, split=split, metric=metric)
    selection["refit_value"] = result.metrics.get(split, {}).get(metric)
    return save_cell(
        feature_set, result, path, selection=selection, backbone_weights=backbone_weights,
        features_sha256=record.features_sha256, format=format,  # refit_record checked the file against it
    )
