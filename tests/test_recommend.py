"""`decouple recommend`: the val-best method (the one save-model deploys), the
methods a paired bootstrap on val cannot tell from it, its test scores and
gain over linear / ce / instance with intervals, and the val-size warning."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
from click.testing import CliRunner

from decouple.errors import DecoupleError
from decouple.study.recommend import recommend
from decouple.study.select import select_record
from decouple.study.store import ResultStore
from test_bootstrap import make_cell

# (head, loss, skill): the logit margin of the true class; balanced_softmax and
# tau_norm are close, ce and cosine far behind.
METHODS = (("linear", "ce", 0.6), ("linear", "balanced_softmax", 3.0), ("tau_norm", "ce", 2.8), ("cosine", "ce", 0.3))


def make_db(path, *, val_per_class, methods=METHODS, seed=0):
    rng = np.random.default_rng(seed)
    val, test = np.repeat(np.arange(6), val_per_class), np.repeat(np.arange(6), 150)
    with ResultStore(path) as store:
        for head, loss, skill in methods:
            for cell_seed in range(3):
                store.insert(make_cell(rng, f"{head}-{loss}-{cell_seed}", head, loss, cell_seed, skill=skill,
                                       val_labels=val, test_labels=test))
    return path


def invoke(*args):
    from cli.main import cli

    return CliRunner().invoke(cli, ["recommend", *map(str, args)])


def test_a_small_val_names_the_close_methods_and_the_size_that_would_separate_them(tmp_path):
    db = make_db(tmp_path / "r.db", val_per_class=10)
    result = invoke("--db", db, "--json", "--resamples", "500")
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    close = {("linear", "balanced_softmax"), ("tau_norm", "ce")}  # 60 val images may rank either first
    assert (found["best"]["head"], found["best"]["loss"]) in close and found["best"]["sampler"] == "instance"
    together = [(method["head"], method["loss"]) for method in found["indistinguishable"]]
    assert together[0] == (found["best"]["head"], found["best"]["loss"]) and set(together) == close
    assert ("cosine", "ce") not in together and ("linear", "ce") not in together
    for name in ("top1", "mean_class_acc", "macro_f1", "many"):
        interval = found["test"][name]
        assert interval["low"] <= interval["mean"] <= interval["high"]
    gain = found["gain_over_baseline"]
    assert 0 < gain["low"] <= gain["mean"] <= gain["high"]
    assert found["val_size_needed"] > found["selected_on"]["n"] == 60
    assert "cannot separate 1 method(s) from the best" in found["warnings"][0]
    text = invoke("--db", db, "--resamples", "500").output
    assert f"best on val: {found['best']['head']} / {found['best']['loss']} / instance" in text
    assert "gain over linear / ce / instance on test: +" in text and "warning: the 60 val images" in text


def test_a_large_val_separates_them_and_warns_of_nothing(tmp_path):
    db = make_db(tmp_path / "r.db", val_per_class=400,
                 methods=(("linear", "ce", 0.6), ("linear", "balanced_softmax", 3.0), ("cosine", "ce", 1.5)))
    found = recommend(str(db), resamples=300)
    assert [method.method.names["loss"] for method in found.indistinguishable] == ["balanced_softmax"]
    assert found.val_size_needed is None and found.warnings == []
    assert all(method.behind.low > 0 for method in found.methods[1:])


def test_the_best_is_the_method_save_model_deploys(tmp_path):
    db = make_db(tmp_path / "r.db", val_per_class=10, seed=3)
    for metric in ("mean_class_acc", "few", "macro_f1"):
        found = recommend(str(db), metric=metric, resamples=100)
        chosen, _ = select_record(str(db), metric=metric)
        assert chosen.cell_key in {record.cell_key for record in found.best.method.records}
        assert found.best.val.mean == pytest.approx(max(method.method.mean for method in found.methods))


def test_the_baseline_itself_gains_nothing_and_a_missing_baseline_is_said(tmp_path):
    only_baseline = recommend(str(make_db(tmp_path / "a.db", val_per_class=10, methods=METHODS[:1])),
                              resamples=100)
    assert only_baseline.gain.to_json() == {"mean": 0.0, "low": 0.0, "high": 0.0}
    no_baseline = recommend(str(make_db(tmp_path / "b.db", val_per_class=10, methods=METHODS[1:])), resamples=100)
    assert no_baseline.gain is None and no_baseline.to_json()["gain_over_baseline"] is None
    assert any("no linear / ce / instance" in text for text in no_baseline.warnings)


def test_bad_metrics_and_databases_without_predictions_are_refused(tmp_path):
    from test_results import make_record

    db = make_db(tmp_path / "r.db", val_per_class=5)
    assert invoke("--db", db, "--metric", "ece").exit_code == 2
    with pytest.raises(DecoupleError, match="recommend ranks by"):
        recommend(str(db), metric="nll")
    old = tmp_path / "old.db"
    with ResultStore(old) as store:
        store.insert(make_record())
    result = invoke("--db", old)
    assert result.exit_code == 2 and "no stored per-image predictions" in result.output
    assert invoke("--db", tmp_path / "missing.db").exit_code == 2


def test_the_options_change_what_they_say(tmp_path):
    from cli.recommend import METRICS
    from decouple.study.bootstrap import BOOTSTRAP_METRICS

    assert set(METRICS) == set(BOOTSTRAP_METRICS)  # the click choices are the metrics the bootstrap knows
    db = make_db(tmp_path / "r.db", val_per_class=10)
    base = json.loads(invoke("--db", db, "--json", "--resamples", "200").output)
    reseeded = json.loads(invoke("--db", db, "--json", "--resamples", "200", "--seed", "1").output)
    assert reseeded["test"]["top1"]["mean"] == base["test"]["top1"]["mean"]
    assert reseeded["test"]["top1"]["low"] != base["test"]["top1"]["low"]
    narrow = json.loads(invoke("--db", db, "--json", "--resamples", "200", "--confidence", "0.5").output)
    width = lambda found: found["test"]["top1"]["high"] - found["test"]["top1"]["low"]  # noqa: E731
    assert width(narrow) < width(base) and narrow["bootstrap"]["confidence"] == 0.5
    shown = invoke("--db", db, "--resamples", "200", "--show", "1").output
    assert "and 1 more (--json lists them all)" in shown
    assert invoke("--db", db, "--features", "f", "--json", "--resamples", "50").exit_code == 0
    missing = invoke("--db", db, "--features", "other")
    assert missing.exit_code == 2 and "other" in missing.output


def test_floating_point_noise_in_equal_scores_decides_nothing(tmp_path):
    """Two methods with the very same predictions differ by 0 in every
    resample, whatever the rounding of their sums: both are in the set, and no
    val size is claimed to separate them."""
    db = make_db(tmp_path / "r.db", val_per_class=300,
                 methods=(("linear", "ce", 0.6), ("linear", "balanced_softmax", 3.0)))
    with ResultStore(db) as store:
        twins = [record for record in store.records(predictions=True) if record.loss == "balanced_softmax"]
        for record in twins:
            record.cell_key += "-twin"
            record.head = "tau_norm"
            store.insert(record)
    found = recommend(str(db), resamples=200)
    heads = {(method.method.names["head"], method.method.names["loss"]) for method in found.indistinguishable}
    assert heads == {("linear", "balanced_softmax"), ("tau_norm", "balanced_softmax")}
    assert found.val_size_needed is None
    assert "make the very same val predictions as the best" in found.warnings[0]


def test_a_baseline_without_the_test_split_gives_no_gain_and_says_so(tmp_path):
    db = make_db(tmp_path / "r.db", val_per_class=10)
    connection = sqlite3.connect(db)
    with connection:
        connection.execute("DELETE FROM metrics WHERE split = 'test' AND cell_id IN "
                           "(SELECT cell_id FROM cells WHERE head = 'linear' AND loss = 'ce')")
    connection.close()
    found = recommend(str(db), resamples=100)
    assert found.gain is None and any("no gain over it" in text for text in found.warnings)
