"""The study's tables (``decouple export --layout study``): one table per
backbone and training profile (:func:`training_profile`), one row per
method (the fine-tuned network's own head shown as its stage-one method),
and for each of balanced test, long-tailed test (test_lt) and the head,
middle and tail classes the test loss (NLL at T = 1), top-1 and macro-F1,
mean ± std over seeds (no std for a row whose cells cannot differ by seed,
:func:`seed_dependent`); then the recorded stage-one runs
(:func:`runs_table`). Built on the summary tables and writers of
:mod:`decouple.study.export`.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from decouple.errors import DecoupleError
from decouple.features import read_attrs
from decouple.metrics import GROUPS
from decouple.stage_two.heads import HEADS
from decouple.stage_two.losses import LOSSES
from decouple.stage_two.samplers import SAMPLERS
from decouple.study.export import (
    FORMATS, NONE_TEXT, Stat, SummaryRow, SummaryTable, best_rows, labelled_methods, latex_escape,
    scale_and_digits, shot_groups_note, summary_csv, summary_html, summary_json, summary_latex, summary_markdown,
)
from decouple.study.store import CellRecord, RunRecord

#: The head whose cells are the fine-tuned network's own classifier: shown as the stage-one method.
OWN_HEAD = "finetuned"
STUDY_METRICS = ("nll_raw", "top1", "macro_f1")
#: Column group -> (the split it is scored on, the stored metric behind each of STUDY_METRICS).
STUDY_GROUPS: Dict[str, Tuple[str, Tuple[str, str, str]]] = {
    "test": ("test", ("nll_raw", "top1", "macro_f1")),
    "test_lt": ("test_lt", ("nll_raw", "top1", "macro_f1")),
    **{name: ("test", (f"{name}_nll", name, f"{name}_f1")) for name in GROUPS},
}
STUDY_GROUP_LABELS = {"test": "Balanced test", "test_lt": "Long-tailed test",
                      "many": "Head", "medium": "Middle", "few": "Tail"}
STUDY_METRIC_LABELS = {"nll_raw": "NLL", "top1": "Acc", "macro_f1": "F1"}
STUDY_NOTE = (
    "NLL: mean negative log-likelihood of softmax(scores) at T = 1 (the test loss, no temperature scaling). "
    "Head / Middle / Tail: the many / medium / few classes on balanced test (Acc and F1: means over their "
    "classes; NLL: over their images), grouped by the long-tailed reference profile's training counts where "
    "the feature file records them."
)
SEED_FREE_NOTE = ("End-to-end and training-free rows: one stage-one run each; their seed is the stage-one seed, "
                  "so no spread is shown.")


@dataclass
class StudyTable:
    """One table of the study layout: its backbone, its training profile, and
    its rows (``table.row_fields`` is ["method"])."""

    backbone: str
    profile: str
    table: SummaryTable

    @property
    def title(self) -> str:
        return f"{self.backbone}, trained on {self.profile}"


def stage_one_method(tags: Dict[str, Any]) -> Optional[str]:
    """The stage-one fine-tuning method named by a feature file's tags:
    stage_one_loss, with " / stage_one_sampler" unless that is instance; None
    without the tag."""
    loss = tags.get("stage_one_loss")
    if loss is None:
        return None
    sampler = tags.get("stage_one_sampler")
    return str(loss) if sampler in (None, "instance") else f"{loss} / {sampler}"


def feature_attrs_or_empty(path: str) -> Dict[str, Any]:
    """A feature file's attributes of /, or {} where it cannot be read (gone
    since the sweep): the results alone must still export."""
    try:
        return read_attrs(path)
    except DecoupleError:
        return {}


def training_profile(record: CellRecord, attrs_of: Callable[[str], Dict[str, Any]] = feature_attrs_or_empty) -> str:
    """A cell's training profile: its feature spec's tag ``profile`` (e.g.
    "balanced", "imbalance 100"), else the feature file's recorded
    train_profile / imbalance (``attrs_of(path)``), else the cell's stored
    training counts (:func:`profile_of_counts`), else "unknown"."""
    if record.tags.get("profile") is not None:
        return str(record.tags["profile"])
    attrs = attrs_of(record.features)
    if attrs.get("train_profile") == "balanced":
        return "balanced"
    imbalance = attrs.get("imbalance")
    if imbalance is None:
        try:
            imbalance = json.loads(attrs.get("config") or "{}").get("imbalance")
        except (TypeError, ValueError):
            imbalance = None
    if imbalance is not None:
        return f"imbalance {float(imbalance):g}"
    return str(attrs.get("train_profile") or profile_of_counts(record.train_counts) or "unknown")


def profile_of_counts(counts: Sequence[int]) -> Optional[str]:
    """A training profile read off training counts (C,): "balanced" when all
    are equal, else "long-tailed (max/min N)", N the rounded ratio; None
    without counts."""
    if not counts:
        return None
    low, high = min(counts), max(counts)
    if low == high:
        return "balanced"
    return f"long-tailed (max/min {round(high / low)})" if low > 0 else "long-tailed"


def _method_text(record: CellRecord, label: Dict[str, Optional[str]]) -> str:
    """A row's method: the stage-one method "(end to end)" for the network's
    own head, else head / loss / sampler (with the settings that tell
    cells of the same names apart, :func:`~decouple.study.export.labelled_methods`)."""
    if record.head == OWN_HEAD:
        settings = (label["head"] or OWN_HEAD)[len(OWN_HEAD):]
        return f"{stage_one_method(record.tags) or OWN_HEAD} (end to end){settings}"
    return " / ".join(label[name] for name in ("head", "loss", "sampler") if label[name] is not None)


def _file_identity(record: CellRecord) -> Tuple[str, str]:
    return record.features_name, record.features_sha256


def study_labels(records: Sequence[CellRecord]) -> List[str]:
    """Each record's row label (:func:`_method_text`). Where the records come
    from several feature files, a head retrained in stage two also names its
    features, " on <stage-one method> features" (" on <feature file>"
    without the tag); a label still shared by several files gets " on <feature
    file>", so that a row only ever averages seeds."""
    labels = labelled_methods(records)
    base = [_method_text(record, label) for record, label in zip(records, labels)]
    texts = list(base)
    if len({_file_identity(record) for record in records}) > 1:
        for index, record in enumerate(records):
            method = stage_one_method(record.tags)
            if record.head != OWN_HEAD:
                texts[index] += f" on {labels[index]['features'] if method is None else method + ' features'}"
    files: Dict[str, set] = {}
    for text, record in zip(texts, records):
        files.setdefault(text, set()).add(_file_identity(record))
    return [f"{base[index]} on {labels[index]['features']}" if len(files[text]) > 1 else text
            for index, text in enumerate(texts)]


def _rank(names: Sequence[str], name: Optional[str]) -> Tuple[int, str]:
    """Position of ``name`` in a registry's order; unknown names after, alphabetically."""
    return (list(names).index(name), "") if name in names else (len(names), str(name))


def _study_order(record: CellRecord, text: str) -> Tuple:
    """End-to-end rows first, by stage-one loss and sampler in registry
    order; then heads retrained in stage two, by the stage-one method of
    their features, head, loss and sampler."""
    losses, samplers = LOSSES.names(), SAMPLERS.names()
    stage_one = (_rank(losses, record.tags.get("stage_one_loss")),
                 _rank(samplers, record.tags.get("stage_one_sampler", "instance")))
    if record.head == OWN_HEAD:
        return (0, *stage_one, text)
    return (1, *stage_one, _rank(HEADS.names(), record.head), _rank(losses, record.loss),
            _rank(samplers, record.sampler), text)


def seed_dependent(head: str) -> bool:
    """Whether cells of ``head`` can differ by the stage-two seed: those of a
    trainable head (or one this version does not know); the fine-tuned
    network's own head and the training-free ncm / knn give one result."""
    return head not in HEADS.names() or HEADS.get(head).trainable


def _study_table(records: Sequence[CellRecord], *, digits: Optional[int], scale: float) -> SummaryTable:
    """One study table over ``records`` (one backbone and training profile)."""
    texts = study_labels(records)
    members: Dict[str, List[CellRecord]] = {}
    for record, text in zip(records, texts):
        members.setdefault(text, []).append(record)
    order = {text: min(_study_order(record, text) for record in cells) for text, cells in members.items()}
    columns = [(group, metric) for group in STUDY_GROUPS for metric in STUDY_METRICS]
    rows = []
    for text in sorted(members, key=order.__getitem__):
        cells = members[text]
        seed_free = not any(seed_dependent(record.head) for record in cells)
        stats = {}
        for group, (split, stored) in STUDY_GROUPS.items():
            for metric, name in zip(STUDY_METRICS, stored):
                stat = Stat.of(record.metrics[split].get(name) for record in cells if split in record.metrics)
                stats[(group, metric)] = dataclasses.replace(stat, std=None) if seed_free else stat
        rows.append(SummaryRow(method={"method": text}, seeds=sorted({record.seed for record in cells}),
                               stats=stats, records=list(cells), seed_free=seed_free))
    note = f"{STUDY_NOTE} {shot_groups_note(records)}"
    if any(row.seed_free for row in rows):
        note += f" {SEED_FREE_NOTE}"
    return SummaryTable(
        row_fields=["method"], columns=columns, rows=rows, best=best_rows(rows, columns, digits=digits, scale=scale),
        split_labels=dict(STUDY_GROUP_LABELS), metric_labels=dict(STUDY_METRIC_LABELS), note=note,
    )


def study_tables(
    records: Sequence[CellRecord],
    *,
    digits: Optional[int] = None,
    scale: float = 1.0,
    attrs_of: Callable[[str], Dict[str, Any]] = feature_attrs_or_empty,
) -> List[StudyTable]:
    """The study layout: one :class:`StudyTable` per (backbone, training
    profile) (:func:`training_profile`), backbones in order of first
    appearance, the balanced profile before the others. ``digits`` /
    ``scale``: as in :func:`~decouple.study.export.summarize`, for marking the best of each column."""
    if not records:
        raise DecoupleError("no cells match the selection; nothing to export")
    attrs_cache: Dict[str, Dict[str, Any]] = {}

    def cached(path: str) -> Dict[str, Any]:
        if path not in attrs_cache:
            attrs_cache[path] = attrs_of(path)
        return attrs_cache[path]

    groups: Dict[Tuple[str, str], List[CellRecord]] = {}
    for record in records:
        backbone = record.backbone or str(cached(record.features).get("backbone") or "unknown")
        groups.setdefault((backbone, training_profile(record, cached)), []).append(record)
    backbones = list(dict.fromkeys(backbone for backbone, _ in groups))
    keys = sorted(groups, key=lambda key: (backbones.index(key[0]), key[1] != "balanced"))
    return [StudyTable(backbone, profile, _study_table(groups[(backbone, profile)], digits=digits, scale=scale))
            for backbone, profile in keys]


def _study_combined(tables: Sequence[StudyTable]) -> SummaryTable:
    """Every study table as one, its rows labelled backbone, profile, method:
    what CSV and JSON write."""
    rows, best = [], {}
    for study in tables:
        offset = len(rows)
        for row in study.table.rows:
            rows.append(SummaryRow(method={"backbone": study.backbone, "profile": study.profile, **row.method},
                                   seeds=row.seeds, stats=row.stats, records=row.records,
                                   seed_free=row.seed_free))
        for column, indices in study.table.best.items():
            best.setdefault(column, []).extend(offset + index for index in indices)
    return SummaryTable(row_fields=["backbone", "profile", "method"], columns=list(tables[0].table.columns),
                        rows=rows, best=best)


RUN_HEADER = ("Backbone", "Stage-one loss", "Sampler", "Profile", "Epochs", "Final train loss", "Train images/s",
              "Seconds", "Feature file")
RUN_NUMBERS = frozenset({"Epochs", "Final train loss", "Train images/s", "Seconds"})  # right-aligned
RUNS_TITLE = "Stage-one runs"
RUNS_NOTE = ("Final train loss: the last fine-tuning epoch's; train images/s: mean over the epochs; seconds: the "
             "whole run, fine-tuning and embedding (– for a file found made, not run by the sweep).")


def runs_table(runs: Sequence[RunRecord]) -> List[List[str]]:
    """One row of text per recorded stage-one run, the columns of :data:`RUN_HEADER`."""
    rows = []
    for run in runs:
        history = run.history or []
        final = history[-1].get("loss") if history else None
        speeds = [epoch["images_per_second"] for epoch in history if epoch.get("images_per_second") is not None]
        rows.append([
            run.backbone, run.loss, run.sampler, run.profile, str(len(history)),
            NONE_TEXT if final is None else f"{final:.3f}",
            NONE_TEXT if not speeds else f"{math.fsum(speeds) / len(speeds):.0f}",
            NONE_TEXT if run.seconds is None else f"{run.seconds:.0f}",
            Path(run.features).name,
        ])
    return rows


def runs_markdown(runs: Sequence[RunRecord]) -> str:
    lines = ["| " + " | ".join(RUN_HEADER) + " |",
             "|" + "|".join(" ---: " if name in RUN_NUMBERS else " --- " for name in RUN_HEADER) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in runs_table(runs)]
    return f"### {RUNS_TITLE}\n\n" + "\n".join(lines) + f"\n\n{RUNS_NOTE}\n"


def runs_latex(runs: Sequence[RunRecord]) -> str:
    spec = "".join("r" if name in RUN_NUMBERS else "l" for name in RUN_HEADER)
    lines = [f"% {RUNS_TITLE}. {RUNS_NOTE}", f"\\begin{{tabular}}{{{spec}}}", "\\toprule",
             " & ".join(latex_escape(name) for name in RUN_HEADER) + " \\\\", "\\midrule"]
    lines += [" & ".join("--" if cell == NONE_TEXT else latex_escape(cell) for cell in row) + " \\\\"
              for row in runs_table(runs)]
    return "\n".join(lines + ["\\bottomrule", "\\end{tabular}"]) + "\n"


def runs_html(runs: Sequence[RunRecord]) -> str:
    esc = html.escape
    out = [f"<h3>{RUNS_TITLE}</h3>", '<table class="decouple-runs">',
           f'<caption style="caption-side:bottom;text-align:left">{esc(RUNS_NOTE)}</caption>',
           "<thead><tr>" + "".join(f"<th>{esc(name)}</th>" for name in RUN_HEADER) + "</tr></thead>", "<tbody>"]
    out += ["<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>" for row in runs_table(runs)]
    return "\n".join(out + ["</tbody>", "</table>"]) + "\n"


def render_study(records: Sequence[CellRecord], *, format: str = "markdown", percent: bool = True,
                 digits: int = 1, runs: Sequence[RunRecord] = ()) -> str:
    """The study layout (:func:`study_tables`) in ``format``: Markdown, LaTeX
    and HTML one titled table per (backbone, training profile), then a table
    of the recorded stage-one ``runs`` (:func:`runs_table`) if any; CSV and
    JSON one row per table and method (no runs), with columns backbone,
    profile, method, seeds and <group>_<metric>_mean / _std / _best (groups
    test, test_lt, many, medium, few; metrics nll_raw, top1, macro_f1)."""
    if format not in FORMATS:
        raise DecoupleError(f"unknown export format {format!r}; known formats: {', '.join(FORMATS)}")
    scale, digits = scale_and_digits(percent, digits)
    tables = study_tables(records, digits=digits, scale=scale)
    if format in ("csv", "json"):
        return (summary_csv if format == "csv" else summary_json)(_study_combined(tables))
    writers = {
        "markdown": (summary_markdown, lambda title: f"### {title}\n\n", runs_markdown),
        "latex": (summary_latex, lambda title: f"% {title}\n", runs_latex),
        "html": (summary_html, lambda title: f"<h3>{html.escape(title)}</h3>\n", runs_html),
    }
    writer, heading, runs_writer = writers[format]
    parts = [heading(study.title) + writer(study.table, scale=scale, digits=digits) for study in tables]
    return "\n".join(parts + ([runs_writer(runs)] if runs else []))


def render_layout(records: Sequence[CellRecord], *, format: str = "markdown", percent: bool = True, digits: int = 1,
                  runs: Sequence[RunRecord] = (), **options: Any) -> str:
    """:func:`render_study` under the ``options`` of
    :func:`~decouple.study.export.render` (its entry in
    :data:`decouple.study.layouts.LAYOUTS`): the columns and rows are fixed,
    so ``metrics``, ``splits``, ``rows``, the per-cell layout
    (``summary=False``) and ``ci`` are refused; the interval settings
    (``resamples``, ``ci_seed``, ``confidence``) go unused."""
    if any(options.get(name) for name in ("metrics", "splits", "rows", "ci")) or options.get("summary") is False:
        raise DecoupleError("the study layout has fixed columns and rows; it takes no metrics, splits, rows, "
                            "per-cell layout or confidence intervals")
    return render_study(records, format=format, percent=percent, digits=digits, runs=runs)
