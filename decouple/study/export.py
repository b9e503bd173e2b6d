"""Export a results database: per-cell rows (CSV, JSON) and the study's
summary table (CSV, JSON, Markdown, LaTeX, HTML).

Per-cell layout (DESIGN.md "Export"): one row per cell and evaluated split,
columns ``features, head, loss, sampler, seed, split, n, top1, top5,
macro_f1, many, medium, few`` and more; an empty group is an empty field.
The JSON of the per-cell layout is the list of stored cells, each like
``decouple head --json`` plus its provenance; both read back equal to the
database.

Summary layout: one row per method (the fields among features, head, loss
and sampler that vary in the selection, or those named by ``rows``), one
column per evaluated split and metric, each the mean and sample standard
deviation over seeds; the best mean of each column (the highest, or the
lowest for the calibration errors of :data:`LOWER_IS_BETTER`) is marked
(bold in Markdown, LaTeX and HTML; ``best`` in CSV and JSON). Tables show
fractions in % (``--percent``) except :data:`UNSCALED_METRICS` (NLL, in
nats), which keep their own unit at the precision a fraction would have.
Where the table shows a many / medium / few column, its note names the rule
of the shot groups the cells were scored with (:func:`shot_groups_note`).

The study layout (``decouple export --layout study``) is
:mod:`decouple.study.study_layout`, built on the tables and writers here;
:mod:`decouple.study.layouts` names both layouts.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from decouple.errors import DecoupleError, did_you_mean
from decouple.metrics import DEFAULT_SHOT_RULE, GROUPS, describe_shot_groups
from decouple.study.bootstrap import (
    BOOTSTRAP_METRICS, DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, DEFAULT_SEED, Intervals,
)
from decouple.study.grid import head_defaults, train_identity
from decouple.study.store import METRIC_COLUMNS, CellRecord, ShotRule

FORMATS = ("csv", "markdown", "latex", "json", "html")
METHOD_FIELDS = ("features", "head", "loss", "sampler")
CELL_COLUMNS = (
    "features", "features_name", "backbone", "head", "loss", "sampler", "seed", "split", "n",
    *METRIC_COLUMNS, "fit_seconds", "cell_key",
)
DEFAULT_METRICS = ("top1", "macro_f1", "many", "medium", "few")
# Splits used to choose epochs / tau; left out of tables unless asked for.
SELECTION_SPLITS = ("val",)
METRIC_LABELS = {
    "top1": "Acc", "top5": "Top-5", "macro_f1": "Macro-F1", "mean_class_acc": "Mean class acc",
    "many": "Many", "medium": "Medium", "few": "Few",
    "many_f1": "Many F1", "medium_f1": "Medium F1", "few_f1": "Few F1",
    "ece": "ECE", "nll": "NLL", "ece_raw": "ECE (uncal.)", "nll_raw": "NLL (uncal.)",
    "many_nll": "Many NLL", "medium_nll": "Medium NLL", "few_nll": "Few NLL",
}
# Calibration (decouple.calibration): ece / nll after temperature scaling on
# val, ece_raw / nll_raw before (<group>_nll: a shot group's, at T = 1). An error: the lowest mean is the best.
GROUP_NLL_METRICS = tuple(f"{name}_nll" for name in GROUPS)
LOWER_IS_BETTER = frozenset({"ece", "nll", "ece_raw", "nll_raw", *GROUP_NLL_METRICS})
# Not fractions (NLL is in nats per image): never multiplied by 100 under --percent.
UNSCALED_METRICS = frozenset({"nll", "nll_raw", *GROUP_NLL_METRICS})
NONE_TEXT = "–"


# ---------------------------------------------------------------------------
# Per-cell rows.
# ---------------------------------------------------------------------------


def cell_rows(
    records: Sequence[CellRecord], *, splits: Optional[Sequence[str]] = None, intervals: Optional[Intervals] = None
) -> List[Dict[str, Any]]:
    """One dict per cell and evaluated split: identity, n, every metric,
    timing; with ``intervals``, <metric>_low and <metric>_high beside each
    metric that has one."""
    rows = []
    for record in records:
        for split, values in record.metrics.items():
            if splits is not None and split not in splits:
                continue
            row: Dict[str, Any] = {
                "features": record.features,
                "features_name": record.features_name,
                "backbone": record.backbone,
                "head": record.head,
                "loss": record.loss,
                "sampler": record.sampler,
                "seed": record.seed,
                "split": split,
                "n": values["n"],
            }
            for name in METRIC_COLUMNS:
                row[name] = values.get(name)
            for name, value in values.items():
                if name not in row and name != "per_class" and _is_number(value):
                    row[name] = value
            if intervals is not None:
                for name in BOOTSTRAP_METRICS:
                    found = intervals.of_cell(record, split, name)
                    row[f"{name}_low"] = None if found is None else found.low
                    row[f"{name}_high"] = None if found is None else found.high
            row["groups"] = _rule_text(record.shot_rule())
            row["fit_seconds"] = record.fit_seconds
            row["cell_key"] = record.cell_key
            rows.append(row)
    return rows


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def cells_csv(
    records: Sequence[CellRecord], *, splits: Optional[Sequence[str]] = None, intervals: Optional[Intervals] = None
) -> str:
    """The per-cell CSV: floats written with repr precision, None as an empty field."""
    rows = cell_rows(records, splits=splits, intervals=intervals)
    columns = list(CELL_COLUMNS)
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row.get(key) is None else row.get(key) for key in columns})
    return buffer.getvalue()


def cells_json(
    records: Sequence[CellRecord], *, splits: Optional[Sequence[str]] = None, intervals: Optional[Intervals] = None
) -> str:
    """Every stored cell as JSON (a list; its per-image predictions where the
    records were read with them), metrics limited to ``splits`` if given;
    with ``intervals``, each cell's "intervals": split -> metric -> {mean,
    low, high}."""
    out = []
    for record in records:
        data = record.to_json()
        if splits is not None:
            data["metrics"] = {split: values for split, values in record.metrics.items() if split in splits}
            if "predictions" in data:
                data["predictions"] = {split: value for split, value in data["predictions"].items() if split in splits}
        if intervals is not None:
            data["intervals"] = {
                split: {name: found.to_json() for name in BOOTSTRAP_METRICS
                        if (found := intervals.of_cell(record, split, name)) is not None}
                for split in data["metrics"]
            }
        out.append(data)
    return json.dumps(out, indent=1, allow_nan=False) + "\n"


# ---------------------------------------------------------------------------
# The summary table.
# ---------------------------------------------------------------------------


@dataclass
class Stat:
    """Mean and sample standard deviation (ddof 1; None for one seed) over seeds."""

    mean: Optional[float]
    std: Optional[float]
    n: int
    #: The bootstrap interval of the mean (``export --ci``), else None.
    low: Optional[float] = None
    high: Optional[float] = None

    @classmethod
    def of(cls, values: Iterable[Optional[float]]) -> "Stat":
        present = [float(value) for value in values if value is not None]
        if not present:
            return cls(None, None, 0)
        mean = math.fsum(present) / len(present)
        if len(present) < 2:
            return cls(mean, None, len(present))
        variance = math.fsum((value - mean) ** 2 for value in present) / (len(present) - 1)
        return cls(mean, math.sqrt(variance), len(present))


@dataclass
class SummaryRow:
    method: Dict[str, Optional[str]]  # row field -> label (name, and settings where needed)
    seeds: List[int]
    stats: Dict[Tuple[str, str], Stat]  # (split, metric) -> Stat
    records: List[CellRecord] = field(default_factory=list, repr=False)
    #: The cells cannot differ by the stage-two seed (:func:`decouple.study.study_layout.seed_dependent`): no std,
    #: no seed count shown.
    seed_free: bool = False

    @property
    def cells(self) -> int:
        """How many cells the row averages (one per seed)."""
        return len(self.records)

    def label(self, fields: Sequence[str]) -> str:
        return " / ".join(self.method[name] or NONE_TEXT for name in fields)


@dataclass
class SummaryTable:
    row_fields: List[str]
    columns: List[Tuple[str, str]]  # (split, metric)
    rows: List[SummaryRow]
    best: Dict[Tuple[str, str], List[int]]  # column -> indices of the best rows
    #: How the intervals were drawn ({"confidence", "resamples", "seed"}); None without intervals.
    ci: Optional[Dict[str, Any]] = None
    #: Shown names of column groups and metrics where not the split's or METRIC_LABELS' own.
    split_labels: Dict[str, str] = field(default_factory=dict)
    metric_labels: Dict[str, str] = field(default_factory=dict)
    #: A further sentence for the table's note (caption).
    note: str = ""

    def split_label(self, split: str) -> str:
        return self.split_labels.get(split, split)

    def metric_label(self, metric: str) -> str:
        return self.metric_labels.get(metric) or _metric_label(metric)

    @property
    def splits(self) -> List[str]:
        return list(dict.fromkeys(split for split, _ in self.columns))

    @property
    def metrics(self) -> List[str]:
        return list(dict.fromkeys(metric for _, metric in self.columns))


def method_of(record: CellRecord) -> Dict[str, Optional[str]]:
    return {"features": record.features_name, "head": record.head, "loss": record.loss, "sampler": record.sampler}


def settings_of(record: CellRecord) -> Dict[str, Dict[str, Any]]:
    """What a cell computed besides its method names and seed, by the row field
    it belongs to: the feature file's content (features), the head's settings
    and the training settings that matter to it, precision included (head),
    the loss's and the sampler's settings. Choices made on val (epoch, tau)
    are results, not settings, and are left out."""
    try:
        train = train_identity(record.head, record.train)
    except DecoupleError:  # a head this version does not know: keep every setting
        train = {k: v for k, v in record.train.items() if k != "device"}
    # Named in full, so that rows told apart by it read groups=thresholds / groups=thirds
    # (records stored before the setting existed used thresholds).
    train["groups"] = record.train.get("groups", DEFAULT_SHOT_RULE)
    # A head setting added after a record was stored reads as its default
    # there, which computes what that record did (weight balancing's max_norm).
    head = {**head_defaults(record.head), **dict(record.params.get("head") or {})}
    # A head setting named like a training setting (weight_decay, lws's epochs)
    # is its own setting: kept under "head.<name>", not hidden by the other.
    head = {f"head.{key}" if key in train else key: value for key, value in head.items()}
    return {
        "features": {"sha256": record.features_sha256},
        "head": {**head, **train},
        "loss": dict(record.params.get("loss") or {}),
        "sampler": dict(record.params.get("sampler") or {}),
    }


_MISSING = "(unset)"


def _setting_text(name: str, value: Any) -> str:
    if name == "sha256" and isinstance(value, str):
        return f"sha256={value[:12]}"
    if isinstance(value, float):
        return f"{name}={value!r}"
    return f"{name}={json.dumps(value, sort_keys=True) if not isinstance(value, str) else value}"


def labelled_methods(records: Sequence[CellRecord]) -> List[Dict[str, Optional[str]]]:
    """Each record's method names, with the settings that tell it apart from
    cells of the same names appended to the field they belong to, e.g. loss
    ``focal (gamma=1.0)`` beside ``focal (gamma=2.0)``, head ``linear
    (precision=bfloat16)``, features ``cifar10_lt (sha256=1a2b3c4d5e6f)``.
    Cells with equal labels differ in their seed alone (and may be averaged)."""
    settings = [settings_of(record) for record in records]
    labels = [method_of(record) for record in records]
    by_names: Dict[Tuple, List[int]] = {}
    for index, names in enumerate(labels):
        by_names.setdefault(tuple(names[name] for name in METHOD_FIELDS), []).append(index)
    for members in by_names.values():
        if len({json.dumps(settings[index], sort_keys=True, default=str) for index in members}) < 2:
            continue
        for name in METHOD_FIELDS:
            keys = sorted({key for index in members for key in settings[index][name]})
            differing = [
                key for key in keys
                if len({json.dumps(settings[index][name].get(key, _MISSING), sort_keys=True, default=str)
                        for index in members}) > 1
            ]
            if not differing:
                continue
            for index in members:
                texts = ", ".join(_setting_text(key, settings[index][name].get(key, _MISSING)) for key in differing)
                labels[index] = {**labels[index], name: f"{labels[index][name] or NONE_TEXT} ({texts})"}
    return labels


def available_splits(records: Sequence[CellRecord]) -> List[str]:
    seen: List[str] = []
    for record in records:
        for split in record.metrics:
            if split not in seen:
                seen.append(split)
    return seen


def available_metrics(records: Sequence[CellRecord]) -> List[str]:
    seen: List[str] = list(METRIC_COLUMNS)
    for record in records:
        for values in record.metrics.values():
            for name, value in values.items():
                if name not in seen and name not in ("n", "per_class") and _is_number(value):
                    seen.append(name)
    return seen


def resolve_splits(records: Sequence[CellRecord], splits: Optional[Sequence[str]]) -> List[str]:
    """The splits asked for (checked), or every evaluated split but val."""
    present = available_splits(records)
    if splits:
        for split in splits:
            if split not in present:
                raise DecoupleError(
                    f"split {split!r} is not in the results; evaluated splits: {', '.join(present)}"
                )
        return list(splits)
    chosen = [split for split in present if split not in SELECTION_SPLITS]
    return chosen or present


def resolve_metrics(records: Sequence[CellRecord], metrics: Optional[Sequence[str]]) -> List[str]:
    known = available_metrics(records)
    if not metrics:
        return list(DEFAULT_METRICS)
    for metric in metrics:
        if metric not in known:
            hint = did_you_mean(metric, known)
            raise DecoupleError(f"unknown metric {metric!r}{hint}; known metrics: {', '.join(known)}")
    return list(metrics)


def _varying_fields(labels: Sequence[Dict[str, Optional[str]]]) -> List[str]:
    return [name for name in METHOD_FIELDS if len({label[name] for label in labels}) > 1]


def summarize(
    records: Sequence[CellRecord],
    *,
    metrics: Optional[Sequence[str]] = None,
    splits: Optional[Sequence[str]] = None,
    rows: Optional[Sequence[str]] = None,
    digits: Optional[int] = None,
    scale: float = 1.0,
    intervals: Optional[Intervals] = None,
) -> SummaryTable:
    """Aggregate cells over seeds into one row per method.

    A row averages only cells that are identical in everything but the seed
    (:func:`labelled_methods`): where cells of one head, loss and sampler
    differ in a setting, the precision, the training settings or the feature
    file's content, the setting labels their rows apart. ``rows`` names the
    method fields that label a row (default: those that vary); a field left
    out must not vary, so only seeds are ever averaged.
    ``digits`` / ``scale``: the best of a column is found on the values as
    displayed (``round(mean * scale, digits)``, see :func:`shown_as` for
    the metrics that are not scaled), so ties at that precision are all
    marked. ``intervals`` (:class:`Intervals`) adds to every column of
    :data:`~decouple.study.bootstrap.BOOTSTRAP_METRICS` the bootstrap
    interval of the row's mean over seeds, the seeds' values averaged per
    resample.
    """
    if not records:
        raise DecoupleError("no cells match the selection; nothing to export")
    splits = resolve_splits(records, splits)
    metrics = resolve_metrics(records, metrics)
    labels = labelled_methods(records)
    row_fields = _row_fields(labels, rows)
    columns = [(split, metric) for split in splits for metric in metrics]
    table_rows = _summary_rows(records, labels, row_fields, columns)
    if intervals is not None:
        for row in table_rows:
            for column in columns:
                found = intervals.of_mean(row.records, *column)
                if found is not None:
                    row.stats[column].low, row.stats[column].high = found.low, found.high
    best = best_rows(table_rows, columns, digits=digits, scale=scale)
    return SummaryTable(row_fields=row_fields, columns=columns, rows=table_rows, best=best,
                        ci=None if intervals is None else intervals.settings())


def _row_fields(labels: Sequence[Dict[str, Optional[str]]], rows: Optional[Sequence[str]]) -> List[str]:
    """The method fields that label a row: ``rows`` (checked to hide no field
    that varies), else those that vary, else head and loss."""
    varying = _varying_fields(labels)
    if not rows:
        return varying or ["head", "loss"]
    for name in rows:
        if name not in METHOD_FIELDS:
            raise DecoupleError(f"unknown row field {name!r}; known: {', '.join(METHOD_FIELDS)}")
    hidden = [name for name in varying if name not in rows]
    if hidden:
        values = sorted({str(label[hidden[0]]) for label in labels})
        raise DecoupleError(
            f"rows {', '.join(rows)} would average over {hidden[0]} ({', '.join(values)}); "
            f"add {hidden[0]} to the rows or select one {hidden[0]}"
        )
    return list(rows)


def _summary_rows(
    records: Sequence[CellRecord],
    labels: Sequence[Dict[str, Optional[str]]],
    row_fields: Sequence[str],
    columns: Sequence[Tuple[str, str]],
) -> List[SummaryRow]:
    """One row per distinct label of ``row_fields``, in order of first
    appearance, with the statistics of every column over its cells."""
    groups: Dict[Tuple, List[CellRecord]] = {}
    for record, label in zip(records, labels):
        groups.setdefault(tuple(label[name] for name in row_fields), []).append(record)
    table_rows = []
    for key, members in groups.items():
        stats = {
            (split, metric): Stat.of(
                record.metrics[split].get(metric) for record in members if split in record.metrics
            )
            for split, metric in columns
        }
        table_rows.append(
            SummaryRow(
                method=dict(zip(row_fields, key)),
                seeds=sorted({record.seed for record in members}),
                stats=stats,
                records=list(members),
            )
        )
    return table_rows


def shown_as(metric: str, scale: float, digits: Optional[int]) -> Tuple[float, Optional[int]]:
    """(scale, digits) a metric's column is displayed with: those asked for,
    except that a metric of :data:`UNSCALED_METRICS` keeps its unit and, in
    %, gets two more digits (the precision of a fraction shown in %)."""
    if metric not in UNSCALED_METRICS:
        return scale, digits
    if digits is None or scale == 1.0:
        return 1.0, digits
    return 1.0, digits + 2


def best_rows(
    table_rows: Sequence[SummaryRow], columns: Sequence[Tuple[str, str]], *, digits: Optional[int], scale: float
) -> Dict[Tuple[str, str], List[int]]:
    """Column -> indices of the rows whose mean, as displayed, is best: the
    highest, or the lowest for a metric of :data:`LOWER_IS_BETTER` (columns
    with fewer than two means mark none)."""
    best: Dict[Tuple[str, str], List[int]] = {}
    for column in columns:
        column_scale, column_digits = shown_as(column[1], scale, digits)
        shown = [
            None if row.stats[column].mean is None
            else (round(row.stats[column].mean * column_scale, column_digits) if column_digits is not None
                  else row.stats[column].mean)
            for row in table_rows
        ]
        present = [value for value in shown if value is not None]
        if len(present) >= 2:
            top = min(present) if column[1] in LOWER_IS_BETTER else max(present)
            best[column] = [index for index, value in enumerate(shown) if value == top]
    return best


# ---------------------------------------------------------------------------
# Rendering.
# ---------------------------------------------------------------------------


def _number(value: Optional[float], scale: float, digits: int) -> str:
    return NONE_TEXT if value is None else f"{value * scale:.{digits}f}"


def _cell_text(value: Optional[float], metric: str, scale: float, digits: int) -> str:
    """A mean or std of ``metric`` as its column shows it (:func:`shown_as`)."""
    column_scale, column_digits = shown_as(metric, scale, digits)
    return _number(value, column_scale, column_digits)


def _interval_text(stat: Stat, metric: str, scale: float, digits: int) -> str:
    """" [low, high]" of a column's interval, or "" without one."""
    if stat.low is None or stat.high is None:
        return ""
    return f" [{_cell_text(stat.low, metric, scale, digits)}, {_cell_text(stat.high, metric, scale, digits)}]"


def _header_label(field_name: str) -> str:
    return {"features": "Features", "head": "Head", "loss": "Loss", "sampler": "Sampler",
            "method": "Method", "backbone": "Backbone", "profile": "Training profile"}[field_name]


def _metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def summary_markdown(table: SummaryTable, *, scale: float = 100.0, digits: int = 1) -> str:
    header = [_header_label(name) for name in table.row_fields] + [
        f"{table.split_label(split)} {table.metric_label(metric)}" for split, metric in table.columns
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(
        [" --- "] * len(table.row_fields) + [" ---: "] * len(table.columns)
    ) + "|"]
    for index, row in enumerate(table.rows):
        cells = [(row.method[name] or NONE_TEXT) for name in table.row_fields]
        for column in table.columns:
            stat = row.stats[column]
            text = _cell_text(stat.mean, column[1], scale, digits)
            if stat.std is not None:
                text += f" ± {_cell_text(stat.std, column[1], scale, digits)}"
            if index in table.best.get(column, ()):
                text = f"**{text}**"
            cells.append(text + _interval_text(stat, column[1], scale, digits))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + _footnote(table, scale) + "\n"


def _rule_text(rule: ShotRule) -> str:
    """A shot-group rule as a short CSV value: "many>100,few<20" or "thirds"."""
    name, many, few = rule
    return name if name != "thresholds" else f"many>{many},few<{few}"


def shot_rules(records: Sequence[CellRecord]) -> List[ShotRule]:
    """The distinct shot-group rules of ``records``, in order of first appearance."""
    return list(dict.fromkeys(record.shot_rule() for record in records))


def shot_groups_note(records: Sequence[CellRecord]) -> str:
    """One sentence naming the shot-group rule of ``records``, e.g. "Shot groups:
    many > 100, medium 20-100, few < 20 training images."; where the cells
    used several rules, it says so and names each."""
    texts = [
        describe_shot_groups(rule) if many is None else describe_shot_groups(
            rule, many_threshold=many, few_threshold=few
        )
        for rule, many, few in shot_rules(records)
    ]
    if len(texts) == 1:
        return f"Shot groups: {texts[0]}."
    return f"Shot groups differ between cells (see the row labels): {'; '.join(texts)}."


def _shows_groups(table: SummaryTable) -> bool:
    """Whether a column of ``table`` is a many / medium / few metric."""
    return any(metric in GROUPS or metric in {f"{name}_f1" for name in GROUPS} for metric in table.metrics)


def interval_note(ci: Dict[str, Any]) -> str:
    """The sentence a table with intervals carries about them."""
    return (
        f"[low, high]: {ci['confidence']:.0%} percentile interval of the row's mean with the split's images "
        f"resampled {ci['resamples']} times within each class (seed {ci['seed']}; the seeds of a row are "
        f"averaged per resample, so the spread between seeds is not in it, the ± is); calibration metrics "
        f"have none."
    )


def _footnote(table: SummaryTable, scale: float) -> str:
    seeds = sorted({row.cells for row in table.rows if not row.seed_free}
                   or {row.cells for row in table.rows})
    unit = "%" if scale == 100.0 else "fraction"
    unscaled = [table.metric_label(metric) for metric in table.metrics if metric in UNSCALED_METRICS]
    if unscaled:
        unit += f" except {' and '.join(unscaled)} (mean nats per image)"
    lower = [table.metric_label(metric) for metric in table.metrics if metric in LOWER_IS_BETTER]
    best = "best mean per column in bold"
    if lower:
        best += f" (the lowest for {', '.join(lower)})"
    seed_text = "/".join(str(count) for count in seeds)
    note = f"\nMean ± sample std over {seed_text} seed(s); values in {unit}; {best}."
    if table.ci is not None:
        note += " " + interval_note(table.ci)
    if _shows_groups(table):
        note += " " + shot_groups_note([record for row in table.rows for record in row.records])
    if table.note:
        note += " " + table.note
    return note


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(char, char) for char in text)


def summary_latex(table: SummaryTable, *, scale: float = 100.0, digits: int = 1) -> str:
    """A booktabs tabular: a column group per split, best of each column in
    bold; the table's note (seeds, unit, shot groups) in a comment above it,
    for the caption."""
    metrics = table.metrics
    splits = table.splits
    spec = "l" * len(table.row_fields) + "".join("r" * len(metrics) for _ in splits)
    lines = [
        "% requires \\usepackage{booktabs}",
        # The note a caption should carry (the Markdown table's footnote).
        *(f"% {line}" for line in _footnote(table, scale).strip().splitlines()),
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
    ]
    first = len(table.row_fields) + 1
    group_header = [""] * len(table.row_fields)
    rules = []
    for index, split in enumerate(splits):
        group_header.append(f"\\multicolumn{{{len(metrics)}}}{{c}}{{{latex_escape(table.split_label(split))}}}")
        start = first + index * len(metrics)
        rules.append(f"\\cmidrule(lr){{{start}-{start + len(metrics) - 1}}}")
    lines.append(" & ".join(group_header) + " \\\\")
    lines.append(" ".join(rules))
    header = [latex_escape(_header_label(name)) for name in table.row_fields]
    header += [latex_escape(table.metric_label(metric)) for _ in splits for metric in metrics]
    lines.append(" & ".join(header) + " \\\\")
    lines.append("\\midrule")
    for index, row in enumerate(table.rows):
        cells = [latex_escape(row.method[name] or "--") for name in table.row_fields]
        for column in table.columns:
            stat = row.stats[column]
            mean = "--" if stat.mean is None else _cell_text(stat.mean, column[1], scale, digits)
            if index in table.best.get(column, ()):
                mean = f"\\textbf{{{mean}}}"
            if stat.std is not None:
                mean += f"{{\\scriptsize$\\pm${_cell_text(stat.std, column[1], scale, digits)}}}"
            if stat.low is not None:
                mean += f"{{\\scriptsize{_interval_text(stat, column[1], scale, digits)}}}"
            cells.append(mean)
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def summary_html(table: SummaryTable, *, scale: float = 100.0, digits: int = 1) -> str:
    """A standalone <table>: a header group per split, best of each column in
    <strong>, the table's note (seeds, unit, shot groups) as a caption under it."""
    esc = html.escape
    metrics, splits = table.metrics, table.splits
    out = [
        '<table class="decouple-results">',
        f'<caption style="caption-side:bottom;text-align:left">{esc(_footnote(table, scale).strip())}</caption>',
        "<thead>", "<tr>",
    ]
    for name in table.row_fields:
        out.append(f'<th rowspan="2">{esc(_header_label(name))}</th>')
    for split in splits:
        out.append(f'<th colspan="{len(metrics)}">{esc(table.split_label(split))}</th>')
    out += ["</tr>", "<tr>"]
    out += [f"<th>{esc(table.metric_label(metric))}</th>" for _ in splits for metric in metrics]
    out += ["</tr>", "</thead>", "<tbody>"]
    for index, row in enumerate(table.rows):
        out.append("<tr>")
        out += [f"<td>{esc(row.method[name] or NONE_TEXT)}</td>" for name in table.row_fields]
        for column in table.columns:
            stat = row.stats[column]
            text = _cell_text(stat.mean, column[1], scale, digits)
            if stat.std is not None:
                text += f" ± {_cell_text(stat.std, column[1], scale, digits)}"
            text = esc(text)
            if index in table.best.get(column, ()):
                text = f"<strong>{text}</strong>"
            text += esc(_interval_text(stat, column[1], scale, digits))
            out.append(f'<td style="text-align:right">{text}</td>')
        out.append("</tr>")
    out += ["</tbody>", "</table>"]
    return "\n".join(out) + "\n"


def summary_csv(table: SummaryTable) -> str:
    """One row per method: row fields, seeds (the number of cells averaged;
    empty for a seed-free row), then <split>_<metric>_mean / _std (as stored,
    full precision: fractions, NLL in nats) and <split>_<metric>_best (1 or 0)."""
    columns = list(table.row_fields) + ["seeds"]
    for split, metric in table.columns:
        columns += [f"{split}_{metric}_mean", f"{split}_{metric}_std", f"{split}_{metric}_best"]
        if table.ci is not None:
            columns += [f"{split}_{metric}_low", f"{split}_{metric}_high"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for index, row in enumerate(table.rows):
        values: List[Any] = [row.method[name] or "" for name in table.row_fields]
        values.append("" if row.seed_free else row.cells)
        for column in table.columns:
            stat = row.stats[column]
            values += [
                "" if stat.mean is None else repr(stat.mean),
                "" if stat.std is None else repr(stat.std),
                int(index in table.best.get(column, ())),
            ]
            if table.ci is not None:
                values += ["" if stat.low is None else repr(stat.low), "" if stat.high is None else repr(stat.high)]
        writer.writerow(values)
    return buffer.getvalue()


def summary_json(table: SummaryTable) -> str:
    rows = []
    for index, row in enumerate(table.rows):
        values: Dict[str, Dict[str, Any]] = {}
        for split, metric in table.columns:
            stat = row.stats[(split, metric)]
            values.setdefault(split, {})[metric] = {
                "mean": stat.mean, "std": stat.std, "n": stat.n,
                "best": index in table.best.get((split, metric), ()),
                **({"low": stat.low, "high": stat.high} if table.ci is not None else {}),
            }
        rows.append({**row.method, "seeds": None if row.seed_free else row.seeds, "cells": row.cells,
                     "metrics": values})
    out = {"row_fields": table.row_fields, "splits": table.splits, "metrics": table.metrics, "rows": rows}
    if table.ci is not None:
        out["intervals"] = table.ci
    return json.dumps(out, indent=1, allow_nan=False) + "\n"


def scale_and_digits(percent: bool, digits: int) -> Tuple[float, int]:
    """Tables in % (scale 100) or as fractions, which need at least 3 decimals."""
    if percent:
        return 100.0, digits
    return 1.0, max(digits, 3)


def render(
    records: Sequence[CellRecord],
    *,
    format: str = "markdown",
    summary: Optional[bool] = None,
    metrics: Optional[Sequence[str]] = None,
    splits: Optional[Sequence[str]] = None,
    rows: Optional[Sequence[str]] = None,
    percent: bool = True,
    digits: int = 1,
    ci: bool = False,
    resamples: int = DEFAULT_RESAMPLES,
    ci_seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
) -> str:
    """The export text of the default layout in ``format`` (the study layout
    is :mod:`decouple.study.study_layout`; either by name:
    :func:`decouple.study.layouts.render`).

    csv and json default to the per-cell layout (``summary=False``);
    markdown, latex and html are always the summary table. ``ci`` adds
    bootstrap confidence intervals (:mod:`decouple.study.bootstrap`) drawn
    from the records' stored predictions (read them with
    ``predictions=True``): ``resamples`` stratified resamples seeded by
    ``ci_seed``, at ``confidence``.
    """
    if format not in FORMATS:
        raise DecoupleError(f"unknown export format {format!r}; known formats: {', '.join(FORMATS)}")
    if not records:
        raise DecoupleError("no cells match the selection; nothing to export")
    if summary is None:
        summary = format not in ("csv", "json")
    intervals = None
    if ci:
        chosen = resolve_splits(records, splits) if splits or summary else available_splits(records)
        wanted = resolve_metrics(records, metrics) if summary else BOOTSTRAP_METRICS
        intervals = Intervals.of_records(records, chosen, metrics=wanted, resamples=resamples, seed=ci_seed,
                                         confidence=confidence)
    if not summary:
        if format not in ("csv", "json"):
            raise DecoupleError(f"the per-cell layout is written as csv or json, not {format}")
        chosen = resolve_splits(records, splits) if splits else None
        writer = cells_csv if format == "csv" else cells_json
        return writer(records, splits=chosen, intervals=intervals)
    scale, digits = scale_and_digits(percent, digits)
    table = summarize(records, metrics=metrics, splits=splits, rows=rows, digits=digits, scale=scale,
                      intervals=intervals)
    if format == "csv":
        return summary_csv(table)
    if format == "json":
        return summary_json(table)
    if format == "markdown":
        return summary_markdown(table, scale=scale, digits=digits)
    if format == "latex":
        return summary_latex(table, scale=scale, digits=digits)
    return summary_html(table, scale=scale, digits=digits)
