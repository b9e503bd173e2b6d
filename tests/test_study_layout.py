"""The study layout of `decouple export --layout study`: one table per
(backbone, training profile) whose numbers are the mean and std over seeds
of the stored metrics, the fine-tuned network's own head shown as its
stage-one method, every format parsing; and the group NLL metrics, from a
hand computation to the stored results and the per-cell CSV."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import textwrap
import xml.etree.ElementTree as ElementTree

import numpy as np
import pytest

from decouple.errors import DecoupleError
from decouple.features import read_attrs, write_features
from decouple.metrics import evaluate, group_nll
from decouple.study.export import cells_csv
from decouple.study.layouts import render
from decouple.study.study_layout import (
    STUDY_GROUPS, STUDY_METRICS, stage_one_method, study_labels, study_tables, training_profile,
)
from decouple.study.store import ResultStore, RunRecord
from decouple.synthetic import gaussian_long_tailed
from test_export import invoke, stored
from test_results import make_record

PROFILES = {"toy_bal": "balanced", "toy_lt": "imbalance 100"}
STAGE_ONE_LOSSES = ("balanced_softmax", "ce")  # inserted out of registry order on purpose
SEEDS = (0, 1, 2)
SPLITS = ("val", "test", "test_lt")


def _metrics(rng: np.random.Generator) -> dict:
    """Every split's stored metrics, random but in range; val too (never shown)."""
    out = {}
    for split in SPLITS:
        values = {"n": 40, "top5": 1.0, "mean_class_acc": 0.5, "per_class": [0.9, 0.7, 0.4, 0.2]}
        for name in ("top1", "macro_f1", "many", "medium", "few", "many_f1", "medium_f1", "few_f1"):
            values[name] = float(rng.uniform(0.1, 0.9))
        for name in ("nll_raw", "many_nll", "medium_nll", "few_nll"):
            values[name] = float(rng.uniform(0.2, 3.0))
        out[split] = values
    return out


def _cell(rng, *, profile_name: str, stage_one: str, head: str, loss, sampler, seed: int):
    features_name = f"{profile_name}_{stage_one}"
    record = make_record(head, loss, sampler, seed, features_name=features_name, splits=SPLITS,
                         key=f"{features_name}-{head}-{loss}-{seed}")
    record.features_sha256 = f"{features_name:x<64}"[:64]
    record.tags = {"profile": PROFILES[profile_name], "stage_one_loss": stage_one, "stage_one_sampler": "instance"}
    record.metrics = _metrics(rng)
    return record


@pytest.fixture()
def study_db(tmp_path):
    """One backbone, two training profiles x two stage-one losses (four feature
    files); on each, the network's own head and a retrained linear head, three
    seeds each; on the long-tailed ce file an ncm cell stored before the group
    NLL existed."""
    rng = np.random.default_rng(14)
    path = tmp_path / "study.db"
    with ResultStore(path) as store:
        for profile_name in PROFILES:
            for stage_one in STAGE_ONE_LOSSES:
                for seed in SEEDS:
                    for head, loss, sampler in (("linear", "balanced_softmax", "instance"), ("finetuned", None, None)):
                        store.insert(_cell(rng, profile_name=profile_name, stage_one=stage_one, head=head,
                                           loss=loss, sampler=sampler, seed=seed))
        old = _cell(rng, profile_name="toy_lt", stage_one="ce", head="ncm", loss=None, sampler=None, seed=0)
        for values in old.metrics.values():
            for name in ("many_nll", "medium_nll", "few_nll"):
                del values[name]
        store.insert(old)
    return path


ROWS = [
    "ce (end to end)",
    "balanced_softmax (end to end)",
    "linear / balanced_softmax / instance on ce features",
    "ncm on ce features",
    "linear / balanced_softmax / instance on balanced_softmax features",
]


def test_one_table_per_backbone_and_profile_rows_in_a_stable_order(study_db):
    tables = study_tables(stored(study_db))
    assert [(study.backbone, study.profile) for study in tables] == [("toy-net", "balanced"),
                                                                   ("toy-net", "imbalance 100")]
    balanced, long_tailed = (study.table for study in tables)
    assert [row.method["method"] for row in long_tailed.rows] == ROWS
    assert [row.method["method"] for row in balanced.rows] == [row for row in ROWS if not row.startswith("ncm")]
    # The same order whatever order the cells were stored in.
    again = study_tables(list(reversed(stored(study_db))))
    assert [row.method["method"] for row in again[1].table.rows] == ROWS


def test_numbers_are_mean_and_std_over_seeds_of_the_stored_metrics(study_db):
    records = stored(study_db)
    for study in study_tables(records):
        for row in study.table.rows:
            assert len(row.records) == len(row.seeds) and all(r.tags["profile"] == study.profile for r in row.records)
            for group, (split, names) in STUDY_GROUPS.items():
                for metric, name in zip(STUDY_METRICS, names):
                    values = [record.metrics[split].get(name) for record in row.records]
                    stat = row.stats[(group, metric)]
                    present = [value for value in values if value is not None]
                    if not present:
                        assert stat.mean is None
                        continue
                    assert stat.mean == pytest.approx(statistics.mean(present), abs=1e-12)
                    assert stat.std == (pytest.approx(statistics.stdev(present), abs=1e-12)
                                        if len(present) > 1 and not row.seed_free else None)
    balanced = study_tables(records)[0].table
    own = next(row for row in balanced.rows if row.method["method"] == "ce (end to end)")
    expected = [r.metrics["test_lt"]["top1"] for r in records
                if r.head == "finetuned" and r.tags == {"profile": "balanced", "stage_one_loss": "ce",
                                                        "stage_one_sampler": "instance"}]
    assert len(expected) == 3 and own.stats[("test_lt", "top1")].mean == pytest.approx(statistics.mean(expected))
    # Each column's stored metric, named here rather than through STUDY_GROUPS.
    cells = [r for r in records if r.head == "finetuned" and r.tags["profile"] == "balanced"
             and r.tags["stage_one_loss"] == "ce"]
    named = {
        ("test", "nll_raw"): ("test", "nll_raw"), ("test", "macro_f1"): ("test", "macro_f1"),
        ("test_lt", "nll_raw"): ("test_lt", "nll_raw"), ("many", "top1"): ("test", "many"),
        ("medium", "macro_f1"): ("test", "medium_f1"), ("few", "nll_raw"): ("test", "few_nll"),
        ("few", "top1"): ("test", "few"),
    }
    for column, (split, name) in named.items():
        values = [r.metrics[split][name] for r in cells]
        assert own.stats[column].mean == pytest.approx(statistics.mean(values), abs=1e-12), column
        assert own.stats[column].std is None, column  # end to end: no spread over stage-two seeds
    # The balanced-profile rows have long-tailed, head, middle and tail columns.
    for row in balanced.rows:
        for group in ("test_lt", "many", "medium", "few"):
            assert all(row.stats[(group, metric)].mean is not None for metric in STUDY_METRICS)
    # A cell stored before the group NLL existed: its other numbers, and no NLL.
    ncm = next(row for row in study_tables(records)[1].table.rows if row.method["method"] == "ncm on ce features")
    assert ncm.stats[("few", "nll_raw")].mean is None and ncm.stats[("few", "top1")].mean is not None


def test_csv_has_every_row_and_the_stored_numbers(study_db):
    records = stored(study_db)
    text = render(records, format="csv", layout="study")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [(row["profile"], row["method"]) for row in rows] == (
        [("balanced", method) for method in ROWS if not method.startswith("ncm")]
        + [("imbalance 100", method) for method in ROWS]
    )
    assert {row["backbone"] for row in rows} == {"toy-net"}
    tables = study_tables(records)
    table_rows = [row for study in tables for row in study.table.rows]
    for row, table_row in zip(rows, table_rows):
        assert row["seeds"] == ("" if table_row.seed_free else str(len(table_row.records)))
        for group in STUDY_GROUPS:
            for metric in STUDY_METRICS:
                stat = table_row.stats[(group, metric)]
                assert row[f"{group}_{metric}_mean"] == ("" if stat.mean is None else repr(stat.mean))
                assert row[f"{group}_{metric}_std"] == ("" if stat.std is None else repr(stat.std))
    # Best of a column per table: the lowest NLL, the highest accuracy.
    balanced = [row for row in rows if row["profile"] == "balanced"]
    best = min(balanced, key=lambda row: float(row["few_nll_raw_mean"]))
    assert [row["method"] for row in balanced if row["few_nll_raw_best"] == "1"] == [best["method"]]
    data = json.loads(render(records, format="json", layout="study"))
    assert data["row_fields"] == ["backbone", "profile", "method"] and len(data["rows"]) == len(rows)


def test_markdown_latex_and_html_parse(study_db):
    records = stored(study_db)
    markdown = render(records, format="markdown", layout="study")
    assert markdown.count("### toy-net, trained on ") == 2
    header = next(line for line in markdown.splitlines() if line.startswith("| Method"))
    assert header.startswith("| Method | Balanced test NLL | Balanced test Acc | Balanced test F1 | "
                             "Long-tailed test NLL")
    assert header.rstrip(" |").endswith("Tail NLL | Tail Acc | Tail F1")
    assert "| ce (end to end) |" in markdown and "values in % except NLL (mean nats per image)" in markdown

    latex = render(records, format="latex", layout="study")
    assert latex.count("\\begin{tabular}{l" + "r" * 15 + "}") == 2 and latex.count("\\end{tabular}") == 2
    assert "\\multicolumn{3}{c}{Long-tailed test}" in latex and "ce (end to end)" in latex

    page = render(records, format="html", layout="study")
    root = ElementTree.fromstring(f"<div>{page}</div>")
    tables = root.findall("table")
    assert len(tables) == 2 and [h.text for h in root.findall("h3")] == [
        "toy-net, trained on balanced", "toy-net, trained on imbalance 100"]
    body = tables[1].find("tbody")
    assert [tr.find("td").text for tr in body.findall("tr")] == ROWS
    assert all(len(tr.findall("td")) == 16 for tr in body.findall("tr"))


def test_command_line_and_plots(study_db, tmp_path):
    from matplotlib.image import imread

    result = invoke("--db", study_db, "--layout", "study", "--format", "markdown", "--plots", tmp_path / "plots")
    assert result.exit_code == 0, result.output
    assert "### toy-net, trained on imbalance 100" in result.output
    png = tmp_path / "plots" / "study_toy-net.png"
    assert sorted(path.name for path in (tmp_path / "plots").iterdir()) == ["study_toy-net.png", "study_toy-net.svg"]
    assert imread(png).shape[0] > 100
    assert ElementTree.parse(tmp_path / "plots" / "study_toy-net.svg").getroot().tag.endswith("svg")
    bad = invoke("--db", study_db, "--layout", "study", "--metrics", "top1")
    assert bad.exit_code == 2 and "the study layout has fixed columns" in bad.output
    assert len(bad.output.strip().splitlines()) == 1
    # The default layout is unchanged by the option.
    assert invoke("--db", study_db).output == invoke("--db", study_db, "--layout", "default").output


def test_row_labels_and_profiles_from_tags_or_the_feature_file(tmp_path):
    assert stage_one_method({"stage_one_loss": "ce", "stage_one_sampler": "class_balanced"}) == "ce / class_balanced"
    assert stage_one_method({"stage_one_loss": "focal", "stage_one_sampler": "instance"}) == "focal"
    assert stage_one_method({"profile": "balanced"}) is None
    # Two runs of one stage-one method in one table are two rows, never averaged.
    twins = [make_record("finetuned", None, None, 0, features_name=name, key=name) for name in ("run_a", "run_b")]
    for twin in twins:
        twin.tags = {"profile": "balanced", "stage_one_loss": "ce", "stage_one_sampler": "class_balanced"}
    assert study_labels(twins) == ["ce / class_balanced (end to end) on run_a",
                                   "ce / class_balanced (end to end) on run_b"]

    record = make_record()
    record.tags = {}
    config = json.dumps({"imbalance": 100.0, "n_max": 50})
    assert training_profile(record, lambda path: {"train_profile": "long_tailed", "config": config}) == "imbalance 100"
    assert training_profile(record, lambda path: {"train_profile": "balanced", "config": config}) == "balanced"
    assert training_profile(record, lambda path: {}) == "long-tailed (max/min 100)"  # its training counts
    record.train_counts = []
    assert training_profile(record, lambda path: {}) == "unknown"
    record.tags = {"profile": "imbalance 50"}
    assert training_profile(record, lambda path: {"train_profile": "balanced"}) == "imbalance 50"

    # Untagged cells: the profile the feature file records (a missing file: the stored training counts).
    feature_set, _ = gaussian_long_tailed(num_classes=4, dim=3, n_max=30, imbalance_factor=10, n_val=2, n_test=3)
    feature_set.attrs = {"train_profile": "balanced", "config": config}
    path = write_features(tmp_path / "bal.h5", feature_set)
    assert read_attrs(path)["train_profile"] == "balanced"
    records = [make_record(seed=seed, key=f"k{seed}") for seed in (0, 1)]
    for record in records:
        record.tags, record.features = {}, str(path)
    gone = make_record(loss="focal", key="gone")
    gone.tags, gone.features = {}, str(tmp_path / "gone.h5")
    assert [(t.profile, [r.method["method"] for r in t.table.rows]) for t in study_tables(records + [gone])] == [
        ("balanced", ["linear / ce / instance"]), ("long-tailed (max/min 100)", ["linear / focal / instance"])]


SEED_FREE = ("ce (end to end)", "balanced_softmax (end to end)", "ncm on ce features")


def test_end_to_end_and_training_free_rows_show_no_spread_over_seeds(study_db, tmp_path, monkeypatch):
    """Their cells cannot differ by the stage-two seed: no ±, no std, no seed
    count, one sentence saying why; trainable heads keep theirs."""
    records = stored(study_db)
    rows = [row for study in study_tables(records) for row in study.table.rows]
    assert {row.method["method"] for row in rows if row.seed_free} == set(SEED_FREE)
    for row in rows:
        assert all((stat.std is None) == row.seed_free for stat in row.stats.values() if stat.mean is not None)
    note = ("End-to-end and training-free rows: one stage-one run each; their seed is the stage-one seed, "
            "so no spread is shown.")

    markdown = render(records, format="markdown", layout="study")
    lines = {line.split(" | ")[0][2:]: line for line in markdown.splitlines() if line.startswith("| ")}
    for method in ROWS:
        assert ("±" in lines[method]) == (method not in SEED_FREE), lines[method]
    assert markdown.count(note) == 2 and "Mean ± sample std over 3 seed(s)" in markdown

    latex = render(records, format="latex", layout="study")
    escaped = {method.replace("_", "\\_") + " &": method for method in ROWS}
    latex_rows = {escaped[line.split(" & ")[0] + " &"]: line for line in latex.splitlines()
                  if line.split(" & ")[0] + " &" in escaped}
    assert len(latex_rows) == len(ROWS)
    for method, line in latex_rows.items():
        assert ("$\\pm$" in line) == (method not in SEED_FREE), line

    root = ElementTree.fromstring(f"<div>{render(records, format='html', layout='study')}</div>")
    for tr in root.findall("table")[1].find("tbody").findall("tr"):
        cells = ["".join(td.itertext()) for td in tr.findall("td")]
        assert any("±" in cell for cell in cells[1:]) == (cells[0] not in SEED_FREE), cells
    assert note in root.findall("table")[1].find("caption").text

    csv_rows = list(csv.DictReader(io.StringIO(render(records, format="csv", layout="study"))))
    for row in csv_rows:
        free = row["method"] in SEED_FREE
        assert (row["seeds"] == "") == free and (row["test_top1_std"] == "") == free, row["method"]
        assert row["test_top1_mean"] != ""
    for row in json.loads(render(records, format="json", layout="study"))["rows"]:
        free = row["method"] in SEED_FREE
        assert (row["seeds"] is None) == free and (row["metrics"]["test"]["top1"]["std"] is None) == free

    # The plot draws no error bar for them.
    from matplotlib.axes import Axes
    from decouple.study.plots import export_study_plots

    drawn = []
    original = Axes.errorbar
    monkeypatch.setattr(Axes, "errorbar", lambda axis, x, y, **kw: drawn.append(kw) or original(axis, x, y, **kw))
    export_study_plots(records, tmp_path / "plots")
    bars = [(kw["xerr"] is None, kw["yerr"] is None) for kw in drawn]
    assert bars.count((True, True)) == 2 * 2 + 1 and bars.count((False, False)) == 2 * 2  # seed-free; linear


def test_a_missing_feature_file_titles_the_table_by_the_stored_training_counts(tmp_path, monkeypatch):
    """Run where the cells' relative feature paths do not resolve: the profile
    comes from the cells' training counts, not "unknown"."""
    monkeypatch.chdir(tmp_path)
    long_tailed = [make_record(seed=seed, key=f"lt{seed}") for seed in (0, 1)]
    balanced = make_record(loss="focal", key="bal")
    for record in long_tailed + [balanced]:
        record.tags = {}
        record.features = "features/not_here.h5"
    for record in long_tailed:
        record.train_counts = [4980, 3224, 2087, 1351, 875, 566, 366, 237, 153, 99]  # CIFAR-10-LT, IF 50
    balanced.train_counts = [30, 30, 30, 30]
    titles = [study.title for study in study_tables(long_tailed + [balanced])]
    assert titles == ["toy-net, trained on balanced", "toy-net, trained on long-tailed (max/min 50)"]
    path = tmp_path / "moved.db"
    with ResultStore(path) as store:
        for record in long_tailed:
            store.insert(record)
    result = invoke("--db", path, "--layout", "study")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("### toy-net, trained on long-tailed (max/min 50)\n")


def _run(loss: str, *, seconds, history) -> RunRecord:
    return RunRecord(run_key=f"key-{loss}", name=f"toy_{loss}", features=f"features/study/toy_{loss}_lt100-1234.h5",
                     features_sha256=loss * 4, backbone="toy-net", loss=loss, sampler="instance",
                     profile="imbalance 100", settings={}, history=history, seconds=seconds)


RUNS = [
    _run("ce", seconds=12.4, history=[{"epoch": 1, "loss": 2.25, "images_per_second": 1000.0},
                                      {"epoch": 2, "loss": 1.5, "images_per_second": 2000.0}]),
    _run("balanced_softmax", seconds=None, history=[{"epoch": 1, "loss": None, "images_per_second": 900.0}]),
]
RUN_LINES = [
    "| toy-net | ce | instance | imbalance 100 | 2 | 1.500 | 1500 | 12 | toy_ce_lt100-1234.h5 |",
    "| toy-net | balanced_softmax | instance | imbalance 100 | 1 | – | 900 | – | toy_balanced_softmax_lt100-1234.h5 |",
]


def test_the_study_tables_list_every_recorded_stage_one_run(study_db):
    with ResultStore(study_db) as store:
        for run in RUNS:
            store.insert_run(run)
    markdown = invoke("--db", study_db, "--layout", "study")
    assert markdown.exit_code == 0, markdown.output
    runs_part = markdown.output.split("### Stage-one runs\n\n")[1]
    lines = runs_part.splitlines()
    assert lines[0] == ("| Backbone | Stage-one loss | Sampler | Profile | Epochs | Final train loss | "
                        "Train images/s | Seconds | Feature file |")
    assert lines[2:4] == RUN_LINES and lines[4] == ""

    page = invoke("--db", study_db, "--layout", "study", "--format", "html").output
    root = ElementTree.fromstring(f"<div>{page}</div>")
    (runs_table,) = root.findall("table[@class='decouple-runs']")
    assert [[td.text for td in tr.findall("td")] for tr in runs_table.find("tbody").findall("tr")] == [
        [cell.strip() for cell in line.strip("|").split("|")] for line in RUN_LINES]

    latex = invoke("--db", study_db, "--layout", "study", "--format", "latex").output
    assert latex.count("\\begin{tabular}") == 3 and "\\begin{tabular}{llllrrrrl}" in latex
    assert "toy-net & balanced\\_softmax & instance & imbalance 100 & 1 & -- & 900 & -- & " in latex
    # CSV and JSON keep their one-row-per-method shape.
    assert "Stage-one" not in invoke("--db", study_db, "--layout", "study", "--format", "csv").output
    # Without recorded runs, no runs table.
    assert "Stage-one runs" not in render(stored(study_db), format="markdown", layout="study")


def test_empty_selection_is_refused():
    with pytest.raises(DecoupleError, match="no cells match"):
        study_tables([])


# ---------------------------------------------------------------------------
# Group NLL.
# ---------------------------------------------------------------------------


def _hand_nll(label: int, row) -> float:
    return -(row[label] - math.log(sum(math.exp(value) for value in row)))


def test_group_nll_equals_the_hand_computed_mean_over_the_groups_images():
    scores = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [1.0, 3.0, 0.0],
                       [0.0, 0.0, 4.0], [1.5, -0.5, 0.5], [-2.0, 1.0, 1.0]])
    labels = np.array([0, 0, 1, 2, 2, 2])
    train_counts = np.array([150, 50, 5])  # many {0}, medium {1}, few {2}
    result = evaluate(labels, scores, train_counts, temperature=2.0)
    by_group = {"many_nll": (0, 1), "medium_nll": (2,), "few_nll": (3, 4, 5)}
    for name, rows in by_group.items():
        expected = statistics.mean(_hand_nll(labels[i], scores[i]) for i in rows)
        assert result[name] == pytest.approx(expected, rel=1e-12)
    # At T = 1 whatever the fitted temperature, and the images weigh equally (not the classes).
    assert result["nll_raw"] == pytest.approx(statistics.mean(_hand_nll(labels[i], scores[i]) for i in range(6)))
    # An empty group, and a group whose classes have no image in the split, are None.
    assert evaluate(labels, scores, np.array([150, 150, 50]))["few_nll"] is None
    assert evaluate(labels[labels != 1], scores[labels != 1], train_counts)["medium_nll"] is None
    assert group_nll(labels, scores, np.array([], dtype=int)) is None
    # A diverged head has no NLL in any group.
    broken = scores.copy()
    broken[0, 0] = np.nan
    assert evaluate(labels, broken, train_counts)["many_nll"] is None


def test_group_nll_flows_into_the_stored_results_and_the_csv(tmp_path):
    feature_set, _ = gaussian_long_tailed(num_classes=6, dim=4, n_max=150, imbalance_factor=50, n_val=4, n_test=6,
                                          seed=1)
    features = write_features(tmp_path / "toy.h5", feature_set)
    config = tmp_path / "sweep.yaml"
    config.write_text(textwrap.dedent(f"""
        features: [{features}]
        grid: {{head: [ncm], seed: [0]}}
        db: {tmp_path / 'results.db'}
    """))
    from decouple.study.runner import run_sweep

    run_sweep(str(config))
    (record,) = stored(tmp_path / "results.db")
    assert {"many", "few"} <= {name for name in ("many", "medium", "few")
                               if record.metrics["test"][name] is not None}
    for name in ("many_nll", "medium_nll", "few_nll"):
        assert name in record.metrics["test"]
    assert record.metrics["test"]["many_nll"] > 0 and record.metrics["test"]["few_nll"] > 0
    rows = list(csv.DictReader(io.StringIO(cells_csv([record]))))
    test_row = next(row for row in rows if row["split"] == "test")
    for name in ("many_nll", "medium_nll", "few_nll"):
        value = record.metrics["test"][name]
        assert test_row[name] == ("" if value is None else str(value))
