"""Per-image predictions and the bootstrap: the compact encoding round-trips,
the resampled metrics reproduce decouple.metrics on the images as they are,
the intervals agree with the closed-form binomial interval, resamples keep
every class's size, pairs are paired, the store keeps predictions (and
upgrades a version-1 database), and ``decouple export --ci`` shows them."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sqlite3

import numpy as np
import pytest
from click.testing import CliRunner

from decouple.metrics import evaluate, shot_groups
from decouple.predictions import SplitPredictions, label_dtype, top_k_labels
from decouple.study.bootstrap import (
    BOOTSTRAP_METRICS, Intervals, bootstrap_split, difference, mean_draws, stratified_weights,
)
from decouple.study.store import CellRecord, ResultStore

COUNTS = np.array([300, 120, 60, 30, 15, 8])  # many 2, medium 2, few 2 under the thresholds


def scored_split(rng, labels, skill, num_classes):
    """Logits whose argmax is right with a probability that grows with ``skill``."""
    scores = rng.normal(size=(len(labels), num_classes))
    scores[np.arange(len(labels)), labels] += skill
    return scores


def make_cell(rng, key, head, loss, seed, *, skill, val_labels, test_labels, sha="f" * 64, rule="thresholds"):
    """A stored cell with real metrics and predictions of its own synthetic scores."""
    metrics, predictions = {}, {}
    for split, labels in (("val", val_labels), ("test", test_labels)):
        scores = scored_split(rng, labels, skill, len(COUNTS))
        metrics[split] = evaluate(labels, scores, COUNTS, shot_rule=rule)
        predictions[split] = SplitPredictions.from_scores(labels, scores)
    return CellRecord(
        cell_key=key, config_hash="c", features="f.h5", features_name="f", features_sha256=sha,
        head=head, loss=loss, sampler=None if loss is None else "instance", seed=seed,
        params={}, train={"groups": rule}, class_names=[str(c) for c in range(len(COUNTS))],
        train_counts=COUNTS.tolist(), metrics=metrics, fit_seconds=0.1, predictions=predictions,
    )


# -- the encoding -------------------------------------------------------------


def test_top_k_labels_rank_best_first_with_argmax_ties_to_the_lowest_class():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(500, 40))
    assert np.array_equal(top_k_labels(scores), np.argsort(-scores, axis=1, kind="stable")[:, :5])
    tied = np.round(rng.normal(size=(500, 12)))  # many exact ties
    top = top_k_labels(tied)
    assert np.array_equal(top[:, 0], tied.argmax(axis=1))
    assert np.array_equal(np.take_along_axis(tied, top, axis=1), -np.sort(-tied, axis=1)[:, :5])
    assert top_k_labels(rng.normal(size=(7, 3))).shape == (7, 3)  # k is capped at C


def test_predictions_round_trip_through_json_in_the_smallest_dtype():
    rng = np.random.default_rng(1)
    for classes, dtype in ((10, "uint8"), (256, "uint8"), (257, "uint16"), (70_000, "uint32")):
        labels = rng.integers(0, classes, size=300)
        scores = rng.normal(size=(300, min(classes, 50)))
        predicted = SplitPredictions(labels, top_k_labels(scores) * (classes // 50 or 1), classes)
        data = json.loads(json.dumps(predicted.to_json()))
        assert data["dtype"] == dtype == label_dtype(classes)
        assert SplitPredictions.from_json(data) == predicted
    with pytest.raises(ValueError, match="expected shape"):
        SplitPredictions.from_json({**data, "n": 301})


# -- the bootstrap ------------------------------------------------------------


@pytest.mark.parametrize("rule", ["thresholds", "thirds"])
def test_the_unresampled_counts_reproduce_every_metric_of_evaluate(rule):
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(6), [50, 40, 30, 20, 10, 0][:6])  # class 5 absent from the split
    tops, expected = [], []
    for skill in (0.5, 2.0, 4.0):
        scores = scored_split(rng, labels, skill, 6)
        scores[:, 4] -= 10.0 * (skill > 3)  # a class never predicted
        tops.append(top_k_labels(scores))
        expected.append(evaluate(labels, scores, COUNTS, shot_rule=rule))
    groups = shot_groups(COUNTS, rule=rule)
    draws = bootstrap_split(labels, tops, 6, [groups] * 3, resamples=50, seed=0)
    for cell, values in zip(draws, expected):
        for name in BOOTSTRAP_METRICS:
            if values[name] is None:
                assert cell.point[name] is None and cell.resampled[name] is None
            else:
                assert cell.point[name] == pytest.approx(values[name], abs=1e-12), name


def test_every_resample_keeps_each_class_size_and_the_seed_fixes_them():
    labels = np.repeat(np.arange(4), [13, 7, 1, 29])
    weights = stratified_weights(labels, 200, 5)
    for label in range(4):
        assert np.all(weights[labels == label].sum(axis=0) == np.sum(labels == label))
    assert np.array_equal(weights, stratified_weights(labels, 200, 5))
    assert not np.array_equal(weights, stratified_weights(labels, 200, 6))
    assert np.all(weights[labels == 2] == 1)  # a one-image class is always itself


def test_top1_interval_agrees_with_the_closed_form_binomial_interval():
    """A large split (20,000 images) where every image is right with
    probability 0.8: the stratified bootstrap and the normal-approximation
    binomial interval p +- 1.96 sqrt(p (1 - p) / n) agree within 0.5 points."""
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(10), 2000)
    correct = rng.random(len(labels)) < 0.8
    predicted = np.where(correct, labels, (labels + rng.integers(1, 10, size=len(labels))) % 10)
    top = np.stack([predicted] + [(predicted + shift) % 10 for shift in range(1, 5)], axis=1)
    draws = bootstrap_split(labels, [top], 10, [shot_groups(np.full(10, 50))], metrics=["top1"], seed=0)
    found = draws[0].interval("top1")
    p, n = correct.mean(), len(labels)
    half = 1.959964 * math.sqrt(p * (1 - p) / n)
    assert found.mean == pytest.approx(p)
    assert abs(found.low - (p - half)) < 0.005 and abs(found.high - (p + half)) < 0.005
    assert found.high - found.low == pytest.approx(2 * half, rel=0.15)


def test_paired_differences_of_identical_and_of_better_predictions():
    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(6), 40)
    scores = scored_split(rng, labels, 1.0, 6)
    top = top_k_labels(scores)
    better = top.copy()
    wrong = np.flatnonzero(top[:, 0] != labels)
    better[wrong[: len(wrong) // 2], 0] = labels[wrong[: len(wrong) // 2]]  # half its errors fixed
    groups = [shot_groups(COUNTS)] * 3
    same, twin, improved = bootstrap_split(labels, [top, top.copy(), better], 6, groups, seed=1)
    gap, spread = difference(same, twin, "mean_class_acc")
    assert (gap.mean, gap.low, gap.high, spread) == (0.0, 0.0, 0.0, 0.0)
    gain, _ = difference(improved, same, "top1")
    assert gain.mean == pytest.approx(len(wrong[: len(wrong) // 2]) / len(labels))
    assert gain.low > 0  # fixing errors is a gain in every resample
    averaged = mean_draws([same, improved])
    assert averaged.point["top1"] == pytest.approx((same.point["top1"] + improved.point["top1"]) / 2)
    assert np.allclose(averaged.resampled["top1"], (same.resampled["top1"] + improved.resampled["top1"]) / 2)


def test_intervals_of_records_pair_the_cells_of_one_split():
    rng = np.random.default_rng(5)
    val, test = np.repeat(np.arange(6), 20), np.repeat(np.arange(6), 60)
    cells = [make_cell(rng, f"k{seed}", "linear", "ce", seed, skill=1.5, val_labels=val, test_labels=test)
             for seed in range(3)]
    intervals = Intervals.of_records(cells, ["test"], resamples=300, seed=0)
    one = intervals.of_cell(cells[0], "test", "top1")
    assert one.low <= cells[0].metrics["test"]["top1"] == one.mean <= one.high
    mean = intervals.of_mean(cells, "test", "top1")
    assert mean.mean == pytest.approx(np.mean([cell.metrics["test"]["top1"] for cell in cells]))
    # Averaging seeds on the same resamples narrows the interval of the mean.
    assert mean.high - mean.low < one.high - one.low
    again = Intervals.of_records(cells, ["test"], resamples=300, seed=0)
    assert again.of_mean(cells, "test", "top1") == mean
    assert intervals.of_cell(cells[0], "val", "top1") is None  # not asked for


# -- the store ----------------------------------------------------------------


def test_the_store_keeps_predictions_and_reads_them_only_when_asked(tmp_path):
    rng = np.random.default_rng(6)
    val, test = np.repeat(np.arange(6), 5), np.repeat(np.arange(6), 9)
    cells = [make_cell(rng, f"k{seed}", "linear", "ce", seed, skill=1.0, val_labels=val, test_labels=test)
             for seed in range(2)]
    with ResultStore(tmp_path / "r.db") as store:
        for cell in cells:
            store.insert(cell)
    with ResultStore.open_existing(tmp_path / "r.db") as store:
        assert all(record.predictions == {} for record in store.records())
        read = store.records(predictions=True)
        assert [record.predictions for record in read] == [cell.predictions for cell in cells]
        assert list(store.records(predictions=True, splits=["test"])[0].predictions) == ["test"]
    # One copy of each split's labels per feature file.
    rows = sqlite3.connect(tmp_path / "r.db").execute("SELECT COUNT(*) FROM split_labels").fetchone()[0]
    assert rows == 2
    assert CellRecord.from_json(json.loads(json.dumps(read[0].to_json()))) == read[0]


def test_a_version_1_database_is_read_as_is_and_upgraded_when_written(tmp_path):
    path = tmp_path / "old.db"
    rng = np.random.default_rng(7)
    val, test = np.repeat(np.arange(6), 5), np.repeat(np.arange(6), 9)
    old = make_cell(rng, "old", "linear", "ce", 0, skill=1.0, val_labels=val, test_labels=test)
    old.predictions = {}
    with ResultStore(path) as store:
        store.insert(old)
    connection = sqlite3.connect(path)
    with connection:
        connection.execute("DROP TABLE predictions")
        connection.execute("DROP TABLE split_labels")
        connection.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    connection.close()
    with ResultStore.open_existing(path) as store:  # read-only: no upgrade, no predictions
        assert store.records(predictions=True)[0].predictions == {}
    new = make_cell(rng, "new", "linear", "ce", 1, skill=1.0, val_labels=val, test_labels=test)
    with ResultStore(path) as store:
        store.insert(new)
    with ResultStore.open_existing(path) as store:
        found = {record.cell_key: record.predictions for record in store.records(predictions=True)}
    assert found == {"old": {}, "new": new.predictions}
    meta = dict(sqlite3.connect(path).execute("SELECT key, value FROM meta"))
    assert meta["schema_version"] == "2"


# -- export --ci --------------------------------------------------------------


@pytest.fixture()
def ci_db(tmp_path):
    rng = np.random.default_rng(8)
    val, test = np.repeat(np.arange(6), 20), np.repeat(np.arange(6), 80)
    path = tmp_path / "r.db"
    with ResultStore(path) as store:
        for loss, skill in (("ce", 0.5), ("balanced_softmax", 2.5)):
            for seed in range(2):
                store.insert(make_cell(rng, f"{loss}{seed}", "linear", loss, seed, skill=skill,
                                       val_labels=val, test_labels=test))
    return path


def export(*args):
    from cli.main import cli

    return CliRunner().invoke(cli, ["export", *map(str, args)])


def test_export_ci_shows_an_interval_around_every_label_metric(ci_db):
    result = export("--db", ci_db, "--ci", "--metrics", "top1,few,ece", "--resamples", "200")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    row = next(line for line in lines if "balanced_softmax" in line)
    top1, few, ece = [cell.strip() for cell in row.strip().strip("|").split("|")[-3:]]
    for text in (top1, few):
        found = re.fullmatch(r"\**([\d.]+)(?: ± [\d.]+)?\** \[([\d.]+), ([\d.]+)\]", text)
        assert found, text
        mean, low, high = map(float, found.groups())
        assert low <= mean <= high
    assert "[" not in ece  # calibration has no interval
    assert "95% percentile interval" in result.output and "resampled 200 times" in result.output
    csv_result = export("--db", ci_db, "--ci", "--format", "csv", "--resamples", "200")
    assert csv_result.exit_code == 0, csv_result.output
    for row in csv.DictReader(io.StringIO(csv_result.output)):
        for name in ("top1", "macro_f1", "many"):
            assert float(row[f"{name}_low"]) <= float(row[name]) <= float(row[f"{name}_high"])
    summary = json.loads(export("--db", ci_db, "--ci", "--format", "json", "--summary", "--resamples", "200").output)
    cell = summary["rows"][0]["metrics"]["test"]["top1"]
    assert cell["low"] <= cell["mean"] <= cell["high"] and summary["intervals"]["resamples"] == 200


def test_export_ci_on_cells_without_predictions_says_how_to_get_them(tmp_path):
    from test_results import make_record

    path = tmp_path / "old.db"
    with ResultStore(path) as store:
        store.insert(make_record())
    result = export("--db", path, "--ci")
    assert result.exit_code == 2
    assert "no stored per-image predictions" in result.output and "rerun" in result.output


def test_diverged_scores_rank_nan_first_as_argmax_does():
    scores = np.array([[np.nan] * 6, [0, 1, 2, 3, 4, 9.0], [1, 2, 3, np.nan, 0, 0], [np.inf, np.nan, 1, 2, 3, 4]])
    top = top_k_labels(scores)
    assert np.array_equal(top[:, 0], scores.argmax(axis=1))
    assert np.array_equal(top[2], [3, 2, 1, 0, 4])


def test_an_empty_split_has_no_intervals_and_unpairable_labels_are_refused():
    empty = bootstrap_split(np.zeros(0, dtype=int), [np.zeros((0, 5), dtype=int)], 6, [shot_groups(COUNTS)],
                            resamples=20)
    assert all(value is None for value in empty[0].point.values())
    assert all(value is None for value in empty[0].resampled.values())
    rng = np.random.default_rng(9)
    val, test = np.repeat(np.arange(6), 5), np.repeat(np.arange(6), 9)
    first = make_cell(rng, "a", "linear", "ce", 0, skill=1.0, val_labels=val, test_labels=test)
    other = make_cell(rng, "b", "linear", "ce", 1, skill=1.0, val_labels=val[::-1].copy(), test_labels=test)
    from decouple.errors import DecoupleError

    with pytest.raises(DecoupleError, match="different val labels"):
        Intervals.of_records([first, other], ["val"], resamples=20)


def test_the_store_refuses_other_labels_for_the_same_feature_file(tmp_path):
    from decouple.errors import DecoupleError

    rng = np.random.default_rng(10)
    val, test = np.repeat(np.arange(6), 5), np.repeat(np.arange(6), 9)
    with ResultStore(tmp_path / "r.db") as store:
        store.insert(make_cell(rng, "a", "linear", "ce", 0, skill=1.0, val_labels=val, test_labels=test))
        with pytest.raises(DecoupleError, match="differ from those stored"):
            store.insert(make_cell(rng, "b", "linear", "ce", 1, skill=1.0, val_labels=val[::-1].copy(),
                                   test_labels=test))
        assert store.count() == 1  # the cell was rolled back whole


def test_export_ci_seed_and_confidence_change_the_intervals_only(ci_db):
    def cell(*extra):
        found = json.loads(export("--db", ci_db, "--ci", "--format", "json", "--summary", "--resamples", "200",
                                  *extra).output)
        return found["rows"][0]["metrics"]["test"]["top1"]

    base, reseeded, narrow = cell(), cell("--ci-seed", "3"), cell("--confidence", "0.5")
    assert base["mean"] == reseeded["mean"] == narrow["mean"] and base["low"] != reseeded["low"]
    assert narrow["high"] - narrow["low"] < base["high"] - base["low"]
