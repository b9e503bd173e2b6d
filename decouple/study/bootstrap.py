"""Bootstrap confidence intervals of the label-based metrics, from stored
per-image predictions (no head is refitted).

The images of a split are resampled with replacement within each true class
(a stratified bootstrap, Efron & Tibshirani, "An Introduction to the
Bootstrap", 1993, sec. 3.5 and 13.3): every class keeps its size in every
resample, so per-class accuracy, mean class accuracy, macro-F1 and the many /
medium / few groups stay defined. An interval is the percentile interval of
the metric over the resamples (1,000 by default, seeded). Every cell scored
on the same split of the same feature file sees the same resamples, which
makes two cells' resampled values paired: a difference between methods, or
a mean over seeds, is computed per resample and its interval read off the
same way (:func:`interval`).

The metrics (:data:`BOOTSTRAP_METRICS`) are recomputed from per-class
counts of each resample: TP_c (correct images of class c), P_c (images
predicted as c) and the top-k hits, with n_c the class's size:
accuracy_c = TP_c / n_c, F1_c = 2 TP_c / (n_c + P_c), top-1 = sum TP_c / n,
as :func:`decouple.metrics.evaluate` defines them on the images as they are
(the resample of all-ones weights reproduces the stored metrics; tested).
Calibration metrics (ECE, NLL) need the probabilities, which are not
stored, and get no interval.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy import sparse

from decouple.errors import DecoupleError
from decouple.metrics import GROUPS, f1_from_counts

if TYPE_CHECKING:
    from decouple.study.store import CellRecord

#: Metrics a bootstrap interval is computed for: those defined by the labels alone.
BOOTSTRAP_METRICS = (
    "top1", "top5", "macro_f1", "mean_class_acc", "many", "medium", "few", "many_f1", "medium_f1", "few_f1",
)
DEFAULT_RESAMPLES = 1000
DEFAULT_CONFIDENCE = 0.95
DEFAULT_SEED = 0
# Resamples drawn and counted at a time (bounds memory: chunk x N weights).
_CHUNK = 250
# Largest product (values) of a batch of cells' error counts with a chunk's weights.
_PRODUCT = 1 << 24


@dataclass(frozen=True)
class Interval:
    """A point estimate (the metric on the images as they are) and its interval."""

    mean: float
    low: float
    high: float

    def to_json(self) -> Dict[str, float]:
        return {"mean": self.mean, "low": self.low, "high": self.high}


def interval(point: float, resampled: np.ndarray, confidence: float = DEFAULT_CONFIDENCE) -> Interval:
    """The percentile interval of ``resampled`` values around ``point``."""
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(np.asarray(resampled, dtype=np.float64), [tail, 1.0 - tail])
    return Interval(float(point), float(low), float(high))


def split_seed(seed: int, split: str) -> int:
    """The resampling seed of one split: fixed by ``seed`` and the split's name."""
    return (int(seed) * 1_000_003 + zlib.crc32(split.encode("utf-8"))) % (2**63)


def stratified_weights(labels: np.ndarray, resamples: int, seed) -> np.ndarray:
    """How often each image is drawn in each resample, (N, resamples) float32:
    per class c, n_c draws with replacement among its n_c images. ``seed``:
    an int or a ``numpy.random.SeedSequence``."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    weights = np.zeros((len(labels), resamples), dtype=np.float32)
    columns = np.arange(resamples)[None, :]
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        draws = rng.integers(0, len(members), size=(len(members), resamples))
        counts = np.bincount((draws * resamples + columns).ravel(), minlength=len(members) * resamples)
        weights[members] = counts.reshape(len(members), resamples)
    return weights


def _error_columns(labels: np.ndarray, tops: Sequence[np.ndarray], num_classes: int):
    """The sparse (K (2C + 1), N) matrix whose weighted row sums are, for
    each of the K cells and class c, the missed images of class c (FN_c),
    the images wrongly predicted as c (FP_c), and the top-k misses. Errors
    are the rarer events, so this is sparser than the correct images;
    TP_c = n_c - FN_c holds in every resample because the resampling keeps
    each class's size."""
    width = 2 * num_classes + 1
    rows, columns = [], []
    for index, top in enumerate(tops):
        top = np.asarray(top)
        predicted = top[:, 0]
        wrong = np.flatnonzero(predicted != labels)
        missed = np.flatnonzero((top != labels[:, None]).all(axis=1))
        offset = index * width
        rows += [offset + labels[wrong], offset + num_classes + predicted[wrong],
                 np.full(len(missed), offset + 2 * num_classes)]
        columns += [wrong, wrong, missed]
    rows, columns = np.concatenate(rows), np.concatenate(columns)
    values = np.ones(len(rows), dtype=np.float32)
    return sparse.csr_matrix((values, (rows, columns)), shape=(len(tops) * width, len(labels)))


def _counts(errors: np.ndarray, support: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(TP (R, C), P (R, C), top-k hits (R,)) from the error counts (R, 2C + 1)."""
    num_classes = len(support)
    missed, false = errors[:, :num_classes], errors[:, num_classes:2 * num_classes]
    tp = support - missed
    return tp, tp + false, support.sum() - errors[:, -1]


def _metrics_from_errors(
    errors: np.ndarray, support: np.ndarray, groups: Mapping[str, np.ndarray], wanted: Sequence[str]
) -> Dict[str, Optional[np.ndarray]]:
    """Each metric of ``wanted`` (checked by the caller) per row of the error
    counts ``errors`` (R, 2C + 1, :func:`_error_columns`); None for an empty
    group, and every metric None for a split without images."""
    num_classes = len(support)
    n = float(support.sum())
    if n == 0:
        return {name: None for name in wanted}
    tp, predicted, hits = _counts(errors, support)
    present = support > 0
    accuracy = tp[:, present] / support[present]  # present classes: support > 0
    f1 = f1_from_counts(tp[:, present], predicted[:, present], support[present])
    index_of = np.full(num_classes, -1)
    index_of[present] = np.arange(int(present.sum()))
    out: Dict[str, Optional[np.ndarray]] = {}
    for name in wanted:
        if name == "top1":
            out[name] = tp.sum(axis=1) / n
        elif name == "top5":
            out[name] = hits / n
        elif name == "mean_class_acc":
            out[name] = accuracy.mean(axis=1)
        elif name == "macro_f1":
            out[name] = f1.mean(axis=1)
        else:  # a shot group's accuracy or F1
            group, is_f1 = (name[:-3], True) if name.endswith("_f1") else (name, False)
            members = index_of[np.asarray(groups[group], dtype=np.int64)]
            members = members[members >= 0]
            out[name] = (f1 if is_f1 else accuracy)[:, members].mean(axis=1) if len(members) else None
    return out


@dataclass
class CellDraws:
    """One cell on one split: the point estimate of each metric and its
    value in every resample (None for an empty group)."""

    point: Dict[str, Optional[float]]
    resampled: Dict[str, Optional[np.ndarray]]

    def interval(self, metric: str, confidence: float = DEFAULT_CONFIDENCE) -> Optional[Interval]:
        values = self.resampled.get(metric)
        if values is None:
            return None
        return interval(self.point[metric], values, confidence)


def bootstrap_split(
    labels: np.ndarray,
    tops: Sequence[np.ndarray],
    num_classes: int,
    groups: Sequence[Mapping[str, np.ndarray]],
    *,
    metrics: Sequence[str] = BOOTSTRAP_METRICS,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> List[CellDraws]:
    """The resampled ``metrics`` of several cells scored on one split, on the
    same stratified resamples (paired).

    ``labels`` (N,) the true classes; ``tops`` one (N, k) array of ranked
    predictions per cell; ``groups`` the many / medium / few class indices
    of each cell (:func:`decouple.metrics.shot_groups`).
    """
    labels = np.asarray(labels, dtype=np.int64)
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1; got {resamples}")
    for name in metrics:
        if name not in BOOTSTRAP_METRICS:
            raise ValueError(f"no bootstrap for metric {name!r}; known: {', '.join(BOOTSTRAP_METRICS)}")
    support = np.bincount(labels, minlength=num_classes).astype(np.float64)
    stacked = _error_columns(labels, tops, num_classes)
    width, count = 2 * num_classes + 1, len(tops)
    point = np.asarray(stacked.sum(axis=1), dtype=np.float64).reshape(count, width)
    points = [_metrics_from_errors(point[index:index + 1], support, groups[index], metrics) for index in range(count)]
    resampled: List[Dict[str, Optional[np.ndarray]]] = [
        {name: None if value is None else np.empty(resamples) for name, value in values.items()} for values in points
    ]
    keys = [tuple(tuple(int(c) for c in cell_groups[name]) for name in GROUPS) for cell_groups in groups]
    # One sparse product per chunk of resamples and batch of cells, each turned
    # into metrics at once: memory stays bounded by _PRODUCT whatever K and C.
    per_batch = max(1, _PRODUCT // (width * _CHUNK))
    batches = [(first, stacked[first * width:min(count, first + per_batch) * width])
               for first in range(0, count, per_batch)]
    chunks = np.random.SeedSequence(seed).spawn(math.ceil(resamples / _CHUNK))
    for start, chunk_seed in zip(range(0, resamples, _CHUNK), chunks):
        size = min(_CHUNK, resamples - start)
        weights = stratified_weights(labels, size, chunk_seed)
        for first, block in batches:
            product = np.asarray(block @ weights).reshape(-1, width, size).transpose(0, 2, 1)
            # Cells with the same shot groups (usually all) turn into metrics in one call.
            by_groups: Dict[tuple, List[int]] = {}
            for offset in range(len(product)):
                by_groups.setdefault(keys[first + offset], []).append(offset)
            for offsets in by_groups.values():
                rows = product[offsets].reshape(-1, width)
                found = _metrics_from_errors(rows, support, groups[first + offsets[0]], metrics)
                for position, offset in enumerate(offsets):
                    for name, values in resampled[first + offset].items():
                        if values is not None:
                            values[start:start + size] = found[name][position * size:(position + 1) * size]
    draws = [
        CellDraws(point={name: None if value is None else float(value[0]) for name, value in values.items()},
                  resampled=cell)
        for values, cell in zip(points, resampled)
    ]
    return draws


def mean_draws(members: Sequence[CellDraws]) -> CellDraws:
    """The mean over cells (e.g. seeds) of paired draws, per metric and resample;
    a metric missing from any member is None."""
    point: Dict[str, Optional[float]] = {}
    resampled: Dict[str, Optional[np.ndarray]] = {}
    for name in members[0].point:
        values = [member.resampled.get(name) for member in members]
        if any(value is None for value in values):
            point[name], resampled[name] = None, None
            continue
        point[name] = math.fsum(member.point[name] for member in members) / len(members)
        resampled[name] = np.mean(values, axis=0)
    return CellDraws(point=point, resampled=resampled)


def difference(first: CellDraws, second: CellDraws, metric: str,
               confidence: float = DEFAULT_CONFIDENCE) -> Optional[Tuple[Interval, float]]:
    """The paired interval of ``first - second`` on ``metric`` and the
    bootstrap standard deviation of the difference; None if either lacks it."""
    a, b = first.resampled.get(metric), second.resampled.get(metric)
    if a is None or b is None:
        return None
    delta = a - b
    spread = float(np.std(delta, ddof=1)) if len(delta) > 1 else 0.0
    return interval(first.point[metric] - second.point[metric], delta, confidence), spread


def record_draws(
    records: Sequence["CellRecord"],
    splits: Sequence[str],
    *,
    metrics: Sequence[str] = BOOTSTRAP_METRICS,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> Dict[Tuple[str, str], CellDraws]:
    """Paired draws of every record on each of ``splits`` it was scored on,
    keyed by (cell_key, split), from the records' stored predictions (read
    with ``predictions=True``). Cells of one feature file and split share
    their resamples (:func:`split_seed`); each cell's shot groups are its own.
    A cell scored on a split without stored predictions is a DecoupleError."""
    metrics = [name for name in metrics if name in BOOTSTRAP_METRICS]
    groups: Dict[Tuple[str, str], List["CellRecord"]] = {}
    lacking = []
    for record in records:
        for split in splits:
            if split not in record.metrics:
                continue
            if split not in record.predictions:
                lacking.append(record)
                break
            groups.setdefault((record.features_sha256, split), []).append(record)
    if lacking:
        raise DecoupleError(
            f"{len(lacking)} of {len(records)} cells have no stored per-image predictions (e.g. "
            f"{lacking[0].head} / {lacking[0].loss or '–'} / {lacking[0].sampler or '–'} seed {lacking[0].seed}; "
            f"cells stored "
            f"before results schema 2); rerun their sweep into a new database to get intervals"
        )
    draws: Dict[Tuple[str, str], CellDraws] = {}
    if not metrics:
        return draws
    for (_, split), members in groups.items():
        first = members[0].predictions[split]
        for member in members[1:]:
            if not np.array_equal(member.predictions[split].labels, first.labels):
                raise DecoupleError(
                    f"cells {members[0].cell_key[:12]} and {member.cell_key[:12]} name the same feature file "
                    f"(sha256 {member.features_sha256[:12]}) but hold different {split} labels; they cannot be paired"
                )
        found = bootstrap_split(
            first.labels,
            [member.predictions[split].top for member in members],
            first.num_classes,
            [member.shot_groups() for member in members],
            metrics=metrics,
            resamples=resamples,
            seed=split_seed(seed, split),
        )
        for member, member_draws in zip(members, found):
            draws[(member.cell_key, split)] = member_draws
    return draws


@dataclass
class Intervals:
    """Paired bootstrap draws of a set of stored cells (:func:`record_draws`)
    and how they were drawn; gives the interval of one cell's metric or of a
    mean over cells (seeds)."""

    draws: Dict[Tuple[str, str], CellDraws]
    resamples: int = DEFAULT_RESAMPLES
    seed: int = DEFAULT_SEED
    confidence: float = DEFAULT_CONFIDENCE

    @classmethod
    def of_records(
        cls,
        records: Sequence["CellRecord"],
        splits: Sequence[str],
        *,
        metrics: Sequence[str] = BOOTSTRAP_METRICS,
        resamples: int = DEFAULT_RESAMPLES,
        seed: int = DEFAULT_SEED,
        confidence: float = DEFAULT_CONFIDENCE,
    ) -> "Intervals":
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1); got {confidence}")
        draws = record_draws(records, splits, metrics=metrics, resamples=resamples, seed=seed)
        return cls(draws, resamples=resamples, seed=seed, confidence=confidence)

    def of_cell(self, record: "CellRecord", split: str, metric: str) -> Optional[Interval]:
        found = self.draws.get((record.cell_key, split))
        return None if found is None else found.interval(metric, self.confidence)

    def mean_of(self, records: Sequence["CellRecord"], split: str) -> Optional[CellDraws]:
        """The paired mean over ``records`` scored on ``split`` (None if any lacks draws)."""
        members = [self.draws.get((record.cell_key, split)) for record in records if split in record.metrics]
        if not members or any(member is None for member in members):
            return None
        return mean_draws(members)

    def of_mean(self, records: Sequence["CellRecord"], split: str, metric: str) -> Optional[Interval]:
        """The interval of the mean of ``metric`` over ``records`` (e.g. a
        method's seeds), averaged per resample."""
        found = self.mean_of(records, split)
        return None if found is None else found.interval(metric, self.confidence)

    def settings(self) -> Dict[str, object]:
        """How the intervals were drawn, for a table's note and JSON."""
        return {"method": "stratified percentile bootstrap", "confidence": self.confidence,
                "resamples": self.resamples, "seed": self.seed}
