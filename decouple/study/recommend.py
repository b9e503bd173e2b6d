"""``decouple recommend``: the method to use on the user's data, with its
uncertainty.

From a sweep's results database alone (its stored per-image predictions,
:mod:`decouple.study.bootstrap`; no head is refitted):

* the val-best method: the best mean val score over its seeds, the same
  choice as ``decouple save-model --select val``
  (:func:`decouple.study.select.rank_methods`);
* the methods val cannot tell from it: those whose paired bootstrap
  interval of (best - method) on the val images, seed means per resample,
  reaches 0 at the chosen confidence (95%; differences within
  :data:`TOLERANCE` of 0 count as 0, so floating-point noise in equal
  scores decides nothing). The set holds the best itself; it is the honest
  answer when val cannot separate the methods;
* the best method's scores on every test split with their intervals,
  computed after the choice and never used for it;
* its gain over the ``linear`` / ``ce`` / ``instance`` baseline on test, a
  paired interval on the test images;
* when val cannot separate the best from the closest method it scores
  differently, the val size that would, if their difference held: the
  bootstrap standard deviation sd of the paired difference d shrinks as
  1 / sqrt(n), so a two-sided test at the chosen confidence finds d with
  80% power at n_needed = n_val ((z_(1-alpha/2) + z_0.8) sd / d)^2 (the
  usual sample-size formula for a difference of paired means).

The intervals resample the images, not the seeds: they say how far a
score could move on other images of the same classes, with the seeds of a
method averaged; the spread between seeds is not in them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Dict, List, Optional, Sequence

from decouple.errors import DecoupleError
from decouple.study.bootstrap import (
    BOOTSTRAP_METRICS, DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, DEFAULT_SEED, Interval, Intervals, difference,
)
from decouple.study.export import METRIC_LABELS
from decouple.study.ranking import RankedMethod, rank_methods, sweep_records

#: Metrics a recommendation can rank by (label-based: the bootstrap resamples them).
RECOMMEND_METRICS = BOOTSTRAP_METRICS
#: Differences closer to 0 than this are 0 (sums of per-class fractions carry ~1e-16 of noise).
TOLERANCE = 1e-9
#: Power at which the val size needed would detect the observed difference.
POWER = 0.8
#: The method every gain is measured against.
BASELINE = {"head": "linear", "loss": "ce", "sampler": "instance"}
SELECTION_SPLIT = "val"


@dataclass
class Compared:
    """A method ranked on val, with its paired difference to the best."""

    method: RankedMethod
    val: Interval
    behind: Optional[Interval]  # best - method on val; None for the best itself
    spread: float = 0.0  # bootstrap standard deviation of that difference

    @property
    def indistinguishable(self) -> bool:
        return self.behind is None or self.behind.low <= TOLERANCE

    def to_json(self) -> Dict[str, Any]:
        return {
            **self.method.names,
            "label": self.method.text(),
            "seeds": len(self.method.records),
            "val": self.val.to_json(),
            "behind_best": None if self.behind is None else self.behind.to_json(),
        }


@dataclass
class Recommendation:
    """What ``decouple recommend`` reports (:meth:`to_json` is its ``--json``)."""

    features: str
    metric: str
    val_size: int
    methods: List[Compared]  # every method, best val mean first
    test_split: Optional[str]
    test: Dict[str, Dict[str, Optional[Interval]]]  # split -> metric -> interval of the best
    baseline: Optional[RankedMethod]
    gain: Optional[Interval]
    val_size_needed: Optional[int]
    settings: Dict[str, Any]
    warnings: List[str] = field(default_factory=list)

    @property
    def best(self) -> Compared:
        return self.methods[0]

    @property
    def indistinguishable(self) -> List[Compared]:
        return [method for method in self.methods if method.indistinguishable]

    def to_json(self) -> Dict[str, Any]:
        def intervals(values: Dict[str, Optional[Interval]]) -> Dict[str, Optional[Dict[str, float]]]:
            return {name: None if value is None else value.to_json() for name, value in values.items()}

        return {
            "features": self.features,
            "metric": self.metric,
            "selected_on": {"split": SELECTION_SPLIT, "n": self.val_size},
            "best": self.best.method.names,
            "best_label": self.best.method.text(),
            "val": self.best.val.to_json(),
            "indistinguishable": [method.to_json() for method in self.indistinguishable],
            "methods_compared": len(self.methods),
            "test_split": self.test_split,
            "test": intervals(self.test.get(self.test_split, {})) if self.test_split else {},
            "test_splits": {split: intervals(values) for split, values in self.test.items()},
            "baseline": None if self.baseline is None else self.baseline.names,
            "gain_over_baseline": None if self.gain is None else {
                **self.gain.to_json(), "metric": self.metric, "split": self.test_split,
            },
            "val_size_needed": self.val_size_needed,
            "warnings": self.warnings,
            "bootstrap": self.settings,
        }


def recommend(
    db: str,
    *,
    features: Optional[str] = None,
    metric: str = "mean_class_acc",
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Recommendation:
    """The recommendation for the sweep of one feature file in ``db`` (module docstring)."""
    if metric not in RECOMMEND_METRICS:
        raise DecoupleError(f"--metric {metric}: recommend ranks by one of {', '.join(RECOMMEND_METRICS)}")
    records = sweep_records(db, features=features, metric=metric, split=SELECTION_SPLIT, predictions=True)
    ranking = rank_methods(records, metric=metric, split=SELECTION_SPLIT)
    val = Intervals.of_records(records, [SELECTION_SPLIT], metrics=[metric], resamples=resamples, seed=seed,
                               confidence=confidence)
    best_draws = val.mean_of(ranking[0].records, SELECTION_SPLIT)
    methods = []
    for rank, method in enumerate(ranking):
        draws = val.mean_of(method.records, SELECTION_SPLIT)
        behind, spread = (None, 0.0) if rank == 0 else difference(best_draws, draws, metric, confidence)
        methods.append(Compared(method, draws.interval(metric, confidence), behind, spread))
    val_size = len(ranking[0].records[0].predictions[SELECTION_SPLIT].labels)

    best, baseline = ranking[0], _baseline(ranking)
    warnings = []
    test_splits = [split for split in best.records[0].metrics if split != SELECTION_SPLIT]
    test_split = "test" if "test" in test_splits else (test_splits[0] if test_splits else None)
    scored = best.records + ([] if baseline is None or baseline is best else baseline.records)
    tests = Intervals.of_records(scored, test_splits, resamples=resamples, seed=seed, confidence=confidence)
    test = {
        split: {name: tests.of_mean(best.records, split, name) for name in BOOTSTRAP_METRICS}
        for split in test_splits
    }
    gain = None
    if baseline is not None and test_split is not None:
        ours, theirs = tests.mean_of(best.records, test_split), tests.mean_of(baseline.records, test_split)
        found = None if ours is None or theirs is None else difference(ours, theirs, metric, confidence)
        if found is None:
            warnings.append(f"the baseline {baseline.text()} has no {metric} on {test_split} for every seed, "
                            f"so there is no gain over it to report")
        else:
            gain = Interval(0.0, 0.0, 0.0) if baseline is best else found[0]

    recommendation = Recommendation(
        features=best.records[0].features_name, metric=metric, val_size=val_size, methods=methods,
        test_split=test_split, test=test, baseline=baseline, gain=gain, val_size_needed=None,
        settings=val.settings(), warnings=warnings,
    )
    _warn(recommendation, confidence)
    return recommendation


def _baseline(ranking: Sequence[RankedMethod]) -> Optional[RankedMethod]:
    """The linear / ce / instance method, preferring the one without settings
    that set it apart (its label is the bare names)."""
    matches = [method for method in ranking if method.names == BASELINE]
    plain = [method for method in matches if all(method.label[name] == BASELINE[name] for name in BASELINE)]
    return (plain or matches or [None])[0]


def _warn(recommendation: Recommendation, confidence: float) -> None:
    """Fill in the val size needed and the warnings of a recommendation. The
    size is the one that would separate the best from the closest method
    that val scores differently (methods with the very same val predictions,
    e.g. two losses that coincide, no val size separates)."""
    methods = recommendation.methods
    others = len(recommendation.indistinguishable) - 1
    if others > 0:
        label = METRIC_LABELS.get(recommendation.metric, recommendation.metric)
        same = [method for method in methods[1:]
                if abs(method.behind.mean) <= TOLERANCE and method.spread <= TOLERANCE]
        closest = next((method for method in methods[1:]
                        if method.indistinguishable and method.spread > TOLERANCE
                        and method.behind.mean > TOLERANCE), None)
        text = (f"the {recommendation.val_size} val images cannot separate {others} method(s) from the best "
                f"at {confidence:.0%}")
        if closest is not None:
            gap = closest.behind.mean
            z = NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0) + NormalDist().inv_cdf(POWER)
            recommendation.val_size_needed = int(math.ceil(recommendation.val_size * (z * closest.spread / gap) ** 2))
            text += (f"; separating it from {closest.method.text()} ({_points(gap)} points of {label} behind) "
                     f"would take about {recommendation.val_size_needed:,} val images ({POWER:.0%} power, if "
                     f"that difference held)")
        if same:
            text += f"; {len(same)} method(s) make the very same val predictions as the best"
        recommendation.warnings.append(text)
    if recommendation.baseline is None:
        recommendation.warnings.append(
            "the sweep has no linear / ce / instance cells, so there is no gain over the baseline to report"
        )


def _points(value: float, *, signed: bool = False) -> str:
    """A fraction in points, one decimal, never "-0.0"."""
    shown = round(value * 100.0, 1) + 0.0
    return f"{shown:+.1f}" if signed else f"{shown:.1f}"


def describe(recommendation: Recommendation, *, shown: int = 10) -> str:
    """The recommendation in a few lines a person reads."""
    label = METRIC_LABELS.get(recommendation.metric, recommendation.metric)
    conf = f"{recommendation.settings['confidence']:.0%}"
    best = recommendation.best

    def pct(interval: Optional[Interval]) -> str:
        if interval is None:
            return "–"
        return f"{_points(interval.mean)} [{_points(interval.low)}, {_points(interval.high)}]"

    def signed(interval: Interval) -> str:
        return (f"{_points(interval.mean, signed=True)} [{_points(interval.low, signed=True)}, "
                f"{_points(interval.high, signed=True)}]")

    together = recommendation.indistinguishable
    width = max(len(method.method.text()) for method in together[:shown + 1])
    lines = [
        f"{recommendation.features}: {len(recommendation.methods)} methods ranked by val {label} "
        f"({recommendation.val_size} images, mean over seeds; {conf} intervals from "
        f"{recommendation.settings['resamples']} stratified bootstrap resamples of the images, "
        f"not of the seeds)",
        f"best on val: {best.method.text()}  {pct(best.val)}",
        f"not separable from it on val (paired bootstrap, {conf}): {len(together)} method(s), "
        f"val score and gap to the best in points",
    ]
    for method in together[:shown]:
        gap = "best" if method.behind is None else signed(method.behind)
        lines.append(f"  {method.method.text().ljust(width)}  {_points(method.val.mean):>5}  {gap}")
    if len(together) > shown:
        lines.append(f"  ... and {len(together) - shown} more (--json lists them all)")
    lines.append(f"{best.method.text()} on the test splits (scored once, never used to choose):")
    for split, values in recommendation.test.items():
        parts = [f"{METRIC_LABELS.get(name, name)} {pct(value)}" for name, value in values.items()
                 if name in ("mean_class_acc", "top1", "macro_f1", "many", "medium", "few")]
        lines.append(f"  {split}: " + " · ".join(parts))
    if recommendation.gain is not None:
        baseline = recommendation.baseline
        lines.append(
            f"gain over {baseline.text()} on {recommendation.test_split}: {signed(recommendation.gain)} points of "
            f"{label} (paired, {conf})"
        )
    lines += [f"warning: {text}" for text in recommendation.warnings]
    return "\n".join(lines)
