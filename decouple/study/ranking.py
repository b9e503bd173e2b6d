"""Ranking the methods of a sweep on val: the choice ``decouple save-model``
and ``decouple recommend`` share. A method is a head, loss and sampler with
the settings that tell its cells apart (as the export tables label it); its
score is the mean over its seeds. Light: no torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Dict, List, Optional

from decouple.errors import DecoupleError
from decouple.metrics import GROUPS
from decouple.study.export import LOWER_IS_BETTER, labelled_methods
from decouple.study.store import CellRecord, load_records

#: Splits a method may be selected on (never a test split).
SELECTION_SPLITS = ("val",)


@dataclass
class RankedMethod:
    """One method of a sweep: its label (head, loss, sampler and the settings
    that tell it apart, as the export tables label it), its cells (one per
    seed) and their mean score on the split it was ranked on."""

    label: Dict[str, Optional[str]]
    records: List[CellRecord]
    mean: float

    @property
    def names(self) -> Dict[str, Optional[str]]:
        """head, loss and sampler as registered (no settings)."""
        first = self.records[0]
        return {"head": first.head, "loss": first.loss, "sampler": first.sampler}

    def text(self) -> str:
        """"head / loss / sampler" with the settings that tell it apart."""
        return " / ".join(self.label[name] or "–" for name in ("head", "loss", "sampler"))


def sweep_records(
    db: str, *, features: Optional[str] = None, metric: str = "mean_class_acc", split: str = "val",
    predictions: bool = False,
) -> List[CellRecord]:
    """The cells of one feature file of ``db`` that have a ``split`` score
    for ``metric`` (read with their per-image predictions if asked); a
    database of several feature files needs ``features``."""
    if split not in SELECTION_SPLITS:
        raise DecoupleError(f"--select {split}: a model is selected on {', '.join(SELECTION_SPLITS)}, never on test")
    records = load_records(db, features=[features] if features else None, predictions=predictions)
    if not records:
        raise DecoupleError(f"{db}: no cells of feature file {features!r}")
    files = sorted({record.features_name for record in records})
    if len(files) > 1:
        raise DecoupleError(
            f"{db}: cells of {len(files)} feature files ({', '.join(files)}); choose one with --features NAME"
        )
    values = [record.metrics.get(split, {}).get(metric) for record in records]
    if any(value is not None and not isinstance(value, (int, float)) for value in values):
        raise DecoupleError(f"--metric {metric}: not a single number per cell; choose e.g. mean_class_acc, few")
    scored = [record for record in records if score_of(record, split, metric) is not None]
    if not scored:
        known = sorted({key for record in records for key in record.metrics.get(split, {}) if key != "per_class"})
        if known and all(not record.metrics.get(split, {}).get("n") for record in records):
            raise DecoupleError(f"{db}: the {split} split has no images, so nothing can be chosen on it")
        if metric in known and metric.replace("_f1", "") in GROUPS:
            raise DecoupleError(
                f"{db}: {metric!r} is empty on {split} for every cell (a shot group with no class under the "
                f"sweep's rule; a sweep with `train: {{groups: thirds}}` fills all three groups); rank by another metric"
            )
        raise DecoupleError(
            f"{db}: no cell has a {split} score for metric {metric!r}"
            + (f"; the {split} metrics are: {', '.join(known)}" if known else f" (the sweep had no {split} split)")
        )
    return scored


def rank_methods(records: List[CellRecord], *, metric: str = "mean_class_acc", split: str = "val") -> List[RankedMethod]:
    """The methods of ``records``, best mean ``metric`` over seeds first (the
    lowest first for the metrics where lower is better: ece, nll, ...);
    equal means keep database order."""
    groups: Dict[str, List[CellRecord]] = {}
    labels: Dict[str, Dict[str, Optional[str]]] = {}
    for record, label in zip(records, labelled_methods(records)):
        key = json.dumps(label, sort_keys=True)
        groups.setdefault(key, []).append(record)
        labels[key] = label
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    ranked = [
        RankedMethod(labels[key], members, math.fsum(score_of(r, split, metric) for r in members) / len(members))
        for key, members in groups.items()
    ]
    return sorted(ranked, key=lambda method: -sign * method.mean)  # stable: equals keep database order


def score_of(record: CellRecord, split: str, metric: str) -> Optional[float]:
    value = record.metrics.get(split, {}).get(metric)
    return None if value is None or not math.isfinite(float(value)) else float(value)
