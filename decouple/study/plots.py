"""Plots of sweep results, written as PNG and SVG (matplotlib figures made
without pyplot, so a user's backend and open figures are left alone).

* :func:`plot_per_class_accuracy`: per-class accuracy against training
  images per class (log axis), one colour per method, mean over seeds; the
  line is a running mean over classes ordered by training count.
* :func:`plot_group_bars`: grouped bars of many / medium / few accuracy per
  method, with the standard deviation over seeds as error bars.
* :func:`plot_study_backbone`: the study layout's plot of one backbone, tail
  (few) accuracy against balanced test top-1 for every method, one marker
  per training profile (:func:`~decouple.study.study_layout.study_tables`).

All read only stored results (per-class accuracy and training counts live
in the database), so the feature files need not be present, and carry a
caption naming the shot-group rule of their cells
(:func:`~decouple.study.export.shot_groups_note`).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from decouple.atomic import atomic_path
from decouple.errors import DecoupleError
from decouple.study.export import SummaryTable, shot_groups_note, shot_rules, summarize
from decouple.study.store import CellRecord
from decouple.study.study_layout import StudyTable, study_tables

GROUPS = ("many", "medium", "few")
GROUP_NAMES = {"many": "Many", "medium": "Medium", "few": "Few"}
#: Markers of the training profiles of a study plot, in table order (balanced first).
PROFILE_MARKERS = ("o", "^", "s", "D", "v", "P", "X")
THIRDS_LABELS = {"many": "Many (top third)", "medium": "Medium (middle third)", "few": "Few (bottom third)"}


def group_labels(records: Sequence[CellRecord]) -> Dict[str, str]:
    """Legend labels of the three groups under the records' shot-group rule,
    e.g. "Many (> 100)"; plain names where the records used several rules."""
    rules = shot_rules(records)
    if len(rules) != 1:
        return dict(GROUP_NAMES)
    rule, many, few = rules[0]
    if rule == "thirds":
        return dict(THIRDS_LABELS)
    return {"many": f"Many (> {many})", "medium": f"Medium ({few}–{many})", "few": f"Few (< {few})"}


def _records_of(table: SummaryTable) -> List[CellRecord]:
    return [record for row in table.rows for record in row.records]


def _caption(figure, text: str) -> None:
    """``text`` in small type under the axes and their (possibly rotated) tick
    labels: a figure-level x label, placed by the constrained layout."""
    figure.set_layout_engine("constrained")
    figure.supxlabel(text, fontsize=7)


def _figure(width: float, height: float):
    """A figure and its axes outside pyplot: no global backend switch and no
    figure registry to close (savefig picks a canvas for the file format)."""
    figure = Figure(figsize=(width, height))
    return figure, figure.subplots()


def _save(figure, stem: Path) -> List[Path]:
    """Save ``stem``.png and ``stem``.svg atomically (temporary name, then rename)."""
    paths = []
    for suffix in ("png", "svg"):
        target = stem.with_name(f"{stem.name}.{suffix}")
        with atomic_path(target) as tmp:
            figure.savefig(tmp, format=suffix, dpi=150, bbox_inches="tight")
        paths.append(target)
    return paths


def safe_name(text: str) -> str:
    """A file-name-safe form of a label."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "results"


def _plot_label(row, fields: Sequence[str]) -> str:
    """A row's method, leaving out the loss and sampler a head does not have."""
    return " / ".join(str(row.method[name]) for name in fields if row.method[name] is not None)


def _running_mean(values, window: int):
    values = np.asarray(values, dtype=float)
    if window <= 1 or len(values) < 3:
        return values
    kernel = np.ones(window)
    valid = ~np.isnan(values)
    sums = np.convolve(np.where(valid, values, 0.0), kernel, mode="same")
    counts = np.convolve(valid.astype(float), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def plot_per_class_accuracy(
    table: SummaryTable,
    stem: os.PathLike,
    *,
    split: str,
    title: Optional[str] = None,
) -> List[Path]:
    """Per-class accuracy on ``split`` against training count, one series per
    row of ``table`` (all rows must share a feature file's classes)."""
    counts = None
    figure, axis = _figure(7.0, 4.2)
    colors = colormaps["tab10" if len(table.rows) <= 10 else "tab20"]
    for index, row in enumerate(table.rows):
        per_seed = [record.metrics[split]["per_class"] for record in row.records if split in record.metrics]
        if not per_seed:
            continue
        row_counts = np.asarray(row.records[0].train_counts, dtype=float)
        if counts is None:
            counts = row_counts
        elif len(row_counts) != len(counts) or not np.array_equal(row_counts, counts):
            raise DecoupleError(
                "per-class plot: the selected cells come from feature files with different classes; "
                "select one feature file"
            )
        accuracy = np.array([[np.nan if value is None else value for value in seed] for seed in per_seed], float)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a class absent from the split
            mean = np.nanmean(accuracy, axis=0)
        order = np.argsort(-counts, kind="stable")
        color = colors(index % colors.N)
        label = _plot_label(row, table.row_fields)
        axis.scatter(counts[order], mean[order], s=10, alpha=0.35, color=color, linewidths=0)
        window = max(1, len(counts) // 10)
        axis.plot(counts[order], _running_mean(mean[order], window), color=color, linewidth=1.6, label=label)
    if counts is None:
        raise DecoupleError(f"per-class plot: no cell was evaluated on split {split!r}")
    axis.set_xscale("log")
    axis.set_xlabel("training images per class (log scale)")
    axis.set_ylabel(f"per-class accuracy on {split}")
    axis.set_ylim(-0.02, 1.02)
    axis.grid(True, which="both", alpha=0.25)
    axis.set_title(title or f"Per-class accuracy vs training count ({split})")
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    _caption(figure, shot_groups_note(_records_of(table)))
    return _save(figure, Path(stem))


def plot_group_bars(
    table: SummaryTable,
    stem: os.PathLike,
    *,
    split: str,
    title: Optional[str] = None,
) -> List[Path]:
    """Grouped bars: many / medium / few accuracy on ``split`` per row of ``table``
    (mean over seeds, std as error bars; an empty group draws no bar)."""
    labels = [_plot_label(row, table.row_fields) for row in table.rows]
    width = 0.8 / len(GROUPS)
    positions = np.arange(len(labels))
    figure, axis = _figure(max(5.0, 0.7 * len(labels) + 2.0), 4.2)
    legend = group_labels(_records_of(table))
    for offset, group in enumerate(GROUPS):
        stats = [row.stats.get((split, group)) for row in table.rows]
        means = [np.nan if stat is None or stat.mean is None else stat.mean for stat in stats]
        errors = [0.0 if stat is None or stat.std is None else stat.std for stat in stats]
        axis.bar(
            positions + (offset - 1) * width, means, width, yerr=errors, capsize=2,
            label=legend[group], error_kw={"linewidth": 0.8},
        )
    axis.set_xticks(positions)
    axis.set_xticklabels(labels, rotation=30 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center",
                         fontsize=8)
    axis.set_ylabel(f"accuracy on {split}")
    axis.set_ylim(0, 1.0)
    axis.grid(True, axis="y", alpha=0.25)
    axis.set_title(title or f"Many / medium / few-shot accuracy ({split})")
    axis.legend(fontsize=8, frameon=False, ncol=3, loc="upper right")
    _caption(figure, shot_groups_note(_records_of(table)))
    return _save(figure, Path(stem))


def export_plots(
    records: Sequence[CellRecord],
    out_dir: os.PathLike,
    *,
    splits: Optional[Sequence[str]] = None,
    rows: Optional[Sequence[str]] = None,
) -> List[Path]:
    """Both plots for every chosen split (per-class plots once per feature
    file); returns the written paths. Names: groups_<split>.{png,svg},
    per_class_<split>.{png,svg} (per_class_<features>_<split> with several
    feature files)."""
    out_dir = Path(out_dir)
    table = summarize(records, metrics=list(GROUPS), splits=splits, rows=rows)
    written: List[Path] = []
    by_features: Dict[str, List[CellRecord]] = {}
    for record in records:
        by_features.setdefault(record.features_name, []).append(record)
    for split in table.splits:
        written += plot_group_bars(table, out_dir / f"groups_{safe_name(split)}", split=split)
        for name, members in by_features.items():
            member_rows = [field for field in table.row_fields if field != "features"] if len(by_features) > 1 else table.row_fields
            sub = summarize(members, metrics=list(GROUPS), splits=[split], rows=member_rows or None)
            stem = f"per_class_{safe_name(split)}" if len(by_features) == 1 else f"per_class_{safe_name(name)}_{safe_name(split)}"
            title = None if len(by_features) == 1 else f"{name}: per-class accuracy vs training count ({split})"
            written += plot_per_class_accuracy(sub, out_dir / stem, split=split, title=title)
    return written


def plot_study_backbone(tables: Sequence[StudyTable], stem: os.PathLike, *, title: Optional[str] = None) -> List[Path]:
    """Tail (few) accuracy against balanced test top-1, one point per method
    and training profile of one backbone's study tables (mean over seeds,
    std as error bars; none for a row without std, as the end-to-end and
    training-free rows): one colour per method, one marker per profile, a
    thin line joining a method's profiles. A method without both numbers
    draws no point."""
    methods = list(dict.fromkeys(row.method["method"] for study in tables for row in study.table.rows))
    colors = colormaps["tab10" if len(methods) <= 10 else "tab20"]
    figure, axis = _figure(7.5, 4.8)
    points: Dict[str, List[tuple]] = {}
    for position, study in enumerate(tables):
        marker = PROFILE_MARKERS[position % len(PROFILE_MARKERS)]
        for row in study.table.rows:
            x, y = row.stats[("test", "top1")], row.stats[("few", "top1")]
            if x.mean is None or y.mean is None:
                continue
            color = colors(methods.index(row.method["method"]) % colors.N)
            axis.errorbar(x.mean, y.mean, xerr=x.std, yerr=y.std, fmt=marker, color=color,
                          markersize=7, elinewidth=0.8, capsize=2)
            points.setdefault(row.method["method"], []).append((x.mean, y.mean))
        axis.plot([], [], marker, color="0.3", linestyle="none", label=f"trained on {study.profile}")
    if not points:
        raise DecoupleError("study plot: no method has both balanced test top-1 and tail accuracy")
    for method, xy in points.items():
        if len(xy) > 1:
            axis.plot(*zip(*xy), color=colors(methods.index(method) % colors.N), linewidth=0.6, alpha=0.5)
        axis.plot([], [], "s", color=colors(methods.index(method) % colors.N), label=method)
    axis.set_xlabel("balanced test top-1")
    axis.set_ylabel("tail (few-shot) accuracy on balanced test")
    axis.grid(True, alpha=0.25)
    axis.set_title(title or f"{tables[0].backbone}: tail vs balanced accuracy")
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    _caption(figure, shot_groups_note([record for study in tables for row in study.table.rows
                                       for record in row.records]))
    return _save(figure, Path(stem))


def export_study_plots(records: Sequence[CellRecord], out_dir: os.PathLike) -> List[Path]:
    """:func:`plot_study_backbone` for every backbone of the study layout,
    as study_<backbone>.{png,svg}; returns the written paths."""
    by_backbone: Dict[str, List[StudyTable]] = {}
    for study in study_tables(records):
        by_backbone.setdefault(study.backbone, []).append(study)
    written: List[Path] = []
    for backbone, tables in by_backbone.items():
        written += plot_study_backbone(tables, Path(out_dir) / f"study_{safe_name(backbone)}")
    return written
