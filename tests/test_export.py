"""Export: per-cell CSV / JSON read back equal to the database, the summary
table (mean ± std over seeds, best marked), plots that are valid images, and
plain errors for a missing or empty database."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
from click.testing import CliRunner

from decouple.errors import DecoupleError
from decouple.study.export import render, summarize
from decouple.study.store import METRIC_COLUMNS, CellRecord, ResultStore
from test_results import make_record

CONTRACT_COLUMNS = ["features", "head", "loss", "sampler", "seed", "split", "n",
                    "top1", "top5", "macro_f1", "many", "medium", "few"]


@pytest.fixture()
def db(tmp_path):
    """Two losses x two seeds of a linear head plus ncm, on one feature file."""
    path = tmp_path / "results.db"
    with ResultStore(path) as store:
        for loss, base in (("ce", 0.40), ("balanced_softmax", 0.60)):
            for seed in (0, 1):
                store.insert(make_record("linear", loss, "instance", seed, top1=base + 0.02 * seed,
                                         few=0.1 if loss == "ce" else 0.5))
        store.insert(make_record("ncm", None, None, 0, top1=0.55, few=0.3))
    return path


def stored(path):
    with ResultStore.open_existing(path) as store:
        return store.records()


def invoke(*args):
    from cli.main import cli

    return CliRunner().invoke(cli, ["export", *map(str, args)])


def test_csv_reads_back_equal_to_the_database(db):
    result = invoke("--db", db, "--format", "csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert set(CONTRACT_COLUMNS) <= set(rows[0])
    records = {record.cell_key: record for record in stored(db)}
    assert len(rows) == sum(len(record.metrics) for record in records.values())
    for row in rows:
        record = records[row["cell_key"]]
        assert row["features"] == record.features
        assert (row["head"], row["loss"] or None, row["sampler"] or None) == (record.head, record.loss, record.sampler)
        assert int(row["seed"]) == record.seed
        values = record.metrics[row["split"]]
        assert int(row["n"]) == values["n"]
        for name in METRIC_COLUMNS:
            assert (None if row[name] == "" else float(row[name])) == values[name]
    assert any(row["medium"] == "" for row in rows)  # an empty group is an empty field


def test_json_reads_back_equal_to_the_database(db, tmp_path):
    out = tmp_path / "cells.json"
    result = invoke("--db", db, "--format", "json", "--out", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [CellRecord.from_json(item) for item in data] == stored(db)


def test_summary_mean_std_over_seeds_and_best_marked(db):
    records = stored(db)
    table = summarize(records, splits=["test"], metrics=["top1", "few", "medium"])
    assert table.row_fields == ["head", "loss", "sampler"]
    by_loss = {row.method["loss"]: row for row in table.rows}
    stat = by_loss["balanced_softmax"].stats[("test", "top1")]
    assert stat.mean == pytest.approx((0.61 + 0.63) / 2)
    assert stat.std == pytest.approx(math.sqrt(2 * 0.01 ** 2))  # sample std of two values
    assert stat.n == 2 and by_loss["balanced_softmax"].seeds == [0, 1]
    assert by_loss[None].stats[("test", "top1")].std is None  # one seed
    assert by_loss[None].stats[("test", "medium")].mean is None  # empty group
    best = table.rows.index(by_loss["balanced_softmax"])
    assert table.best[("test", "top1")] == [best]
    assert ("test", "medium") not in table.best

    markdown = render(records, format="markdown", splits=["test"], metrics=["top1", "few", "medium"])
    line = next(line for line in markdown.splitlines() if "balanced_softmax" in line)
    assert "**62.0 ± 1.4**" in line and "**50.0 ± 0.0**" in line
    assert "| ncm | – | – | 56.0 | 30.0 | – |" in markdown

    latex = render(records, format="latex", splits=["test"], metrics=["top1", "few"])
    assert r"balanced\_softmax & instance & \textbf{62.0}{\scriptsize$\pm$1.4}" in latex
    assert r"\multicolumn{2}{c}{test}" in latex and latex.count(r"\textbf") == 2

    html = render(records, format="html", splits=["test"], metrics=["top1"])
    assert "<strong>62.0 ± 1.4</strong>" in html and html.startswith("<table")


def test_ties_at_the_shown_precision_are_all_marked():
    records = [make_record(loss="ce", top1=0.50001), make_record(loss="focal", top1=0.50002)]
    table = summarize(records, splits=["test"], metrics=["top1"], digits=1, scale=100.0)
    assert table.best[("test", "top1")] == [0, 1]


def test_rows_follow_what_varies_and_never_average_methods_together(db):
    records = [r for r in stored(db) if r.head == "linear"]
    assert summarize(records).row_fields == ["loss"]
    with pytest.raises(DecoupleError, match="would average over loss"):
        summarize(stored(db), rows=["head"])


def test_summary_csv_and_json(db):
    text = render(stored(db), format="csv", summary=True, metrics=["top1"], splits=["test", "val"])
    rows = list(csv.DictReader(io.StringIO(text)))
    assert {"head", "loss", "sampler", "seeds", "test_top1_mean", "test_top1_std", "val_top1_best"} <= set(rows[0])
    data = json.loads(render(stored(db), format="json", summary=True, metrics=["top1"]))
    assert data["splits"] == ["test"]  # val is left out by default
    best = [row for row in data["rows"] if row["metrics"]["test"]["top1"]["best"]]
    assert [row["loss"] for row in best] == ["balanced_softmax"]


def test_filters_and_choices_from_the_command_line(db):
    result = invoke("--db", db, "--format", "markdown", "--loss", "ce", "--loss", "focal", "--metrics", "top1,few")
    assert result.exit_code == 0, result.output
    assert "balanced_softmax" not in result.output
    assert "| linear | ce | 42.0 ± 1.4 | 10.0 ± 0.0 |" in result.output  # one row: nothing marked best
    assert "test Acc" in result.output and "test Few" in result.output
    bad = invoke("--db", db, "--metrics", "top2")
    assert bad.exit_code == 2 and "unknown metric 'top2' (did you mean 'top5'?)" in bad.output
    bad = invoke("--db", db, "--splits", "test_lt")
    assert bad.exit_code == 2 and "split 'test_lt' is not in the results; evaluated splits: val, test" in bad.output
    none = invoke("--db", db, "--loss", "ldam")
    assert none.exit_code == 2 and "no cells match the selection" in none.output


def test_missing_or_empty_database_says_so_plainly(tmp_path):
    missing = tmp_path / "missing.db"
    result = invoke("--db", missing, "--format", "csv")
    assert result.exit_code == 2
    assert "missing.db: no such results database; run `decouple sweep CONFIG.yaml` first" in result.output
    assert not missing.exists()
    ResultStore(tmp_path / "empty.db").close()
    result = invoke("--db", tmp_path / "empty.db", "--format", "latex")
    assert result.exit_code == 2 and "holds no finished cells yet" in result.output


def test_plots_are_valid_png_and_svg(db, tmp_path):
    from matplotlib.image import imread

    out = tmp_path / "plots"
    result = invoke("--db", db, "--format", "markdown", "--plots", out, "--splits", "test,val")
    assert result.exit_code == 0, result.output
    names = sorted(path.name for path in out.iterdir())
    assert names == sorted(f"{kind}_{split}.{ext}" for kind in ("groups", "per_class")
                           for split in ("test", "val") for ext in ("png", "svg"))
    for path in out.glob("*.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    for path in out.glob("*.svg"):
        assert ElementTree.parse(path).getroot().tag.endswith("svg")


def test_plots_leave_the_users_matplotlib_backend_alone(tmp_path):
    # A notebook's backend survives an export: no matplotlib.use, no pyplot.
    code = (
        "import sys, matplotlib\n"
        "matplotlib.use('pdf')\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from test_results import make_record\n"
        "from decouple.study.plots import export_plots\n"
        "records = [make_record(loss=loss, seed=seed, key=f'{loss}{seed}') for loss in ('ce', 'focal') for seed in (0, 1)]\n"
        "written = export_plots(records, sys.argv[2], splits=['test'])\n"
        "print(len(written), matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["4", "pdf", "False"]


def test_per_class_plots_once_per_feature_file(tmp_path):
    from decouple.study.plots import export_plots

    records = [make_record(loss=loss, seed=seed, features_name=name, key=f"{name}{loss}{seed}")
               for name in ("resnet_lt", "vit_lt") for loss in ("ce", "focal") for seed in (0, 1)]
    written = export_plots(records, tmp_path, splits=["test"])
    assert sorted(path.name for path in written) == sorted(
        ["groups_test.png", "groups_test.svg", "per_class_resnet_lt_test.png", "per_class_resnet_lt_test.svg",
         "per_class_vit_lt_test.png", "per_class_vit_lt_test.svg"]
    )


def _variant(loss, seed, *, gamma=None, precision="float32", sha="ab", top1=0.5):
    record = make_record("linear", loss, "instance", seed, top1=top1,
                         key=f"{loss}-{seed}-{gamma}-{precision}-{sha}")
    record.params = {"epoch": 3 + seed, "tau": seed, "loss": {} if gamma is None else {"gamma": gamma}}
    record.train = {"epochs": None, "lr": 0.05, "precision": precision, "device": f"cuda:{seed}"}
    record.features_sha256 = sha * 32
    return record


def test_rows_average_only_cells_that_differ_in_the_seed_alone(tmp_path):
    # Two gammas of focal and two precisions of ce, two seeds each; the
    # per-seed choices (epoch, tau) and the device differ too but are not settings.
    path = tmp_path / "mixed.db"
    with ResultStore(path) as store:
        for seed in (0, 1):
            store.insert(_variant("focal", seed, gamma=1.0, top1=0.40 + 0.02 * seed))
            store.insert(_variant("focal", seed, gamma=2.0, top1=0.80 + 0.02 * seed))
            store.insert(_variant("ce", seed, precision="float32", top1=0.50 + 0.02 * seed))
            store.insert(_variant("ce", seed, precision="bfloat16", top1=0.60 + 0.02 * seed))
    table = summarize(stored(path), splits=["test"], metrics=["top1"])
    assert table.row_fields == ["head", "loss"]
    by_label = {row.label(table.row_fields): row for row in table.rows}
    assert set(by_label) == {
        "linear / focal (gamma=1.0)", "linear / focal (gamma=2.0)",
        "linear (precision=float32) / ce", "linear (precision=bfloat16) / ce",
    }
    # make_record's test top-1 is its top1 + 0.01; the seeds add 0 and 0.02.
    for label, mean in (("linear / focal (gamma=1.0)", 0.42), ("linear / focal (gamma=2.0)", 0.82),
                        ("linear (precision=float32) / ce", 0.52), ("linear (precision=bfloat16) / ce", 0.62)):
        row = by_label[label]
        assert row.cells == 2 and row.seeds == [0, 1]
        assert row.stats[("test", "top1")].mean == pytest.approx(mean)  # never the 62.0 ± 23.1 of a mix
        assert row.stats[("test", "top1")].std == pytest.approx(0.02 * math.sqrt(0.5))
    markdown = render(stored(path), format="markdown", splits=["test"], metrics=["top1"])
    assert "| linear | focal (gamma=2.0) |" in markdown and "over 2 seed(s)" in markdown
    summary = list(csv.DictReader(io.StringIO(render(stored(path), format="csv", summary=True,
                                                     splits=["test"], metrics=["top1"]))))
    assert sorted(row["seeds"] for row in summary) == ["2", "2", "2", "2"]


def test_a_changed_feature_file_is_its_own_row(tmp_path):
    path = tmp_path / "files.db"
    with ResultStore(path) as store:
        for seed in (0, 1):
            store.insert(_variant("ce", seed, sha="ab", top1=0.5))
            store.insert(_variant("ce", seed, sha="cd", top1=0.7))
    table = summarize(stored(path), splits=["test"], metrics=["top1"])
    labels = sorted(row.label(table.row_fields) for row in table.rows)
    assert labels == [f"toy (sha256={'ab' * 6})", f"toy (sha256={'cd' * 6})"]
    assert all(row.cells == 2 for row in table.rows)


def test_calibration_metrics_nll_unscaled_and_lowest_error_bold(tmp_path):
    # ECE is a fraction shown in %; NLL is in nats, shown as is (two more
    # digits under --percent); for both the lowest mean is the best.
    path = tmp_path / "calibration.db"
    calibration = {"ce": (0.10, 1.23456, 0.30, 2.5), "balanced_softmax": (0.05, 0.81234, 0.20, 1.5),
                   "focal": (0.08, 0.70123, 0.25, 1.75)}
    with ResultStore(path) as store:
        for loss, (ece, nll, ece_raw, nll_raw) in calibration.items():
            record = make_record("linear", loss, "instance", 0)
            for values in record.metrics.values():
                values.update(ece=ece, nll=nll, ece_raw=ece_raw, nll_raw=nll_raw)
            store.insert(record)
    result = invoke("--db", path, "--format", "markdown", "--metrics", "ece,nll")
    assert result.exit_code == 0, result.output
    assert "| Loss | test ECE | test NLL |" in result.output
    assert "| ce | 10.0 | 1.235 |" in result.output
    assert "| balanced_softmax | **5.0** | 0.812 |" in result.output  # lowest ECE, not the highest
    assert "| focal | 8.0 | **0.701** |" in result.output  # lowest NLL, never 70.1
    assert "values in % except NLL (mean nats per image)" in result.output
    assert "(the lowest for ECE, NLL)" in result.output

    fraction = invoke("--db", path, "--format", "markdown", "--metrics", "ece_raw,nll_raw", "--fraction")
    assert fraction.exit_code == 0, fraction.output
    assert "test ECE (uncal.)" in fraction.output and "test NLL (uncal.)" in fraction.output
    assert "| balanced_softmax | **0.200** | **1.500** |" in fraction.output

    latex = invoke("--db", path, "--format", "latex", "--metrics", "ece,nll")
    assert latex.exit_code == 0 and r"balanced\_softmax & \textbf{5.0} & 0.812 \\" in latex.output
    html = invoke("--db", path, "--format", "html", "--metrics", "nll")
    assert html.exit_code == 0 and "<strong>0.701</strong>" in html.output
    summary = json.loads(invoke("--db", path, "--format", "json", "--summary", "--metrics", "ece,nll").output)
    best = {metric: [row["loss"] for row in summary["rows"] if row["metrics"]["test"][metric]["best"]]
            for metric in ("ece", "nll")}
    assert best == {"ece": ["balanced_softmax"], "nll": ["focal"]}
    assert summary["rows"][0]["metrics"]["test"]["nll"]["mean"] == 1.23456  # stored values, unscaled
    rows = list(csv.DictReader(io.StringIO(invoke("--db", path, "--format", "csv").output)))
    assert {float(row["nll"]) for row in rows} == {1.23456, 0.81234, 0.70123}
