"""The SQLite results store: round trip, atomic cells, plain errors."""

from __future__ import annotations

import sqlite3

import pytest

from decouple.errors import DecoupleError
from decouple.study.store import CellRecord, ResultStore, load_records


def make_record(head="linear", loss="ce", sampler="instance", seed=0, *, key=None, top1=0.5, few=0.25,
                features_name="toy", splits=("val", "test")) -> CellRecord:
    """A hand-made stored cell with 4 classes (train counts 200, 50, 10, 2)."""
    metrics = {}
    for offset, split in enumerate(splits):
        metrics[split] = {
            "n": 40,
            "top1": top1 + offset / 100,
            "top5": 1.0,
            "macro_f1": top1 - 0.05,
            "mean_class_acc": top1,
            "many": 0.9,
            "medium": None,
            "few": few,
            "per_class": [0.9, 0.7, None, few],
        }
    return CellRecord(
        cell_key=key or f"{features_name}-{head}-{loss}-{sampler}-{seed}",
        config_hash="c0ffee",
        features=f"features/{features_name}.h5",
        features_name=features_name,
        features_sha256="ab" * 32,
        head=head,
        loss=loss,
        sampler=sampler,
        seed=seed,
        params={"epoch": 3, "loss": {"gamma": 2.0}},
        train={"epochs": 3, "lr": 2.0},
        class_names=["a", "b", "c", "d"],
        train_counts=[200, 50, 10, 2],
        metrics=metrics,
        fit_seconds=0.125,
        backbone="toy-net",
        tags={"train_data": "long_tailed"},
        versions={"python": "3.x"},
        wall_seconds=0.5,
        finished_at="2024-01-01T00:00:00+00:00",
    )


def test_insert_and_read_back_equal(tmp_path):
    records = [make_record(seed=0), make_record(seed=1, top1=0.6), make_record("ncm", None, None)]
    with ResultStore(tmp_path / "r.db") as store:
        for record in records:
            assert store.insert(record)
        assert store.count() == 3
        assert store.finished_keys() == {record.cell_key for record in records}
        assert store.records() == records


def test_empty_group_is_null_in_sql(tmp_path):
    with ResultStore(tmp_path / "r.db") as store:
        store.insert(make_record())
    row = sqlite3.connect(tmp_path / "r.db").execute(
        "SELECT medium, few FROM metrics WHERE split = 'test'"
    ).fetchone()
    assert row == (None, 0.25)


def test_duplicate_key_is_not_written_twice(tmp_path):
    with ResultStore(tmp_path / "r.db") as store:
        assert store.insert(make_record())
        assert not store.insert(make_record(top1=0.9))
        assert store.records()[0].metrics["test"]["top1"] == pytest.approx(0.51)


def test_a_failing_cell_leaves_nothing_behind(tmp_path):
    bad = make_record(key="bad")
    bad.metrics["test"]["unserialisable"] = object()  # fails after the cells row is written
    with ResultStore(tmp_path / "r.db") as store:
        store.insert(make_record())
        with pytest.raises(TypeError):
            store.insert(bad)
        assert store.count() == 1
    connection = sqlite3.connect(tmp_path / "r.db")
    assert connection.execute("SELECT COUNT(*) FROM metrics").fetchone()[0] == 2  # val + test of one cell


def test_filters(tmp_path):
    with ResultStore(tmp_path / "r.db") as store:
        store.insert(make_record(loss="ce"))
        store.insert(make_record(loss="focal"))
        store.insert(make_record("ncm", None, None))
        assert [r.loss for r in store.records(losses=["focal"])] == ["focal"]
        assert [r.head for r in store.records(losses=["none"])] == ["ncm"]
        assert len(store.records(features=["toy"])) == 3
        assert len(store.records(features=["features/toy.h5"])) == 3
        assert list(store.records(splits=["test"])[0].metrics) == ["test"]


@pytest.mark.parametrize("cells", [2, 30])
def test_records_reads_any_number_of_cells_in_two_queries(tmp_path, cells):
    with ResultStore(tmp_path / "r.db") as store:
        for seed in range(cells):
            store.insert(make_record(seed=seed, key=f"cell{seed}", top1=0.5 + seed / 100))
        selects = []
        store._conn.set_trace_callback(lambda sql: selects.append(sql) if sql.lstrip().startswith("SELECT") else None)
        records = store.records(heads=["linear"], splits=["test"])
        store._conn.set_trace_callback(None)
    # One query to see that the table exists, then the cells, then all their metrics.
    assert len(selects) == 3, selects
    assert [record.seed for record in records] == list(range(cells))
    assert [round(record.metrics["test"]["top1"], 2) for record in records] == [
        round(0.51 + seed / 100, 2) for seed in range(cells)]
    assert all(list(record.metrics) == ["test"] for record in records)


def test_missing_database_says_so_and_is_not_created(tmp_path):
    path = tmp_path / "nothing.db"
    with pytest.raises(DecoupleError, match="no such results database"):
        load_records(path)
    assert not path.exists()


def test_empty_database_says_so(tmp_path):
    ResultStore(tmp_path / "r.db").close()
    with pytest.raises(DecoupleError, match="holds no finished cells"):
        load_records(tmp_path / "r.db")
    (tmp_path / "zero.db").write_bytes(b"")
    with pytest.raises(DecoupleError, match="holds no finished cells"):
        load_records(tmp_path / "zero.db")


def test_foreign_files_are_refused(tmp_path):
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)")
    with pytest.raises(DecoupleError, match="not a decouple results database"):
        ResultStore.open_existing(other)
    text = tmp_path / "text.db"
    text.write_text("not sqlite at all, clearly" * 20)
    with pytest.raises(DecoupleError, match="cannot be read"):
        ResultStore.open_existing(text)


def test_a_crash_while_creating_the_schema_leaves_a_database_that_opens(tmp_path):
    # The process dies right after the first CREATE TABLE. Created table by
    # table (autocommitted), that left tables without the meta row and a file
    # refused ever after; in one transaction SQLite rolls it back.
    import subprocess
    import sys
    import textwrap

    db = tmp_path / "results.db"
    script = textwrap.dedent(f"""
        import os, sqlite3
        import decouple.study.store as store

        class DiesAfterFirstCreate(sqlite3.Connection):
            def execute(self, sql, *args):
                cursor = super().execute(sql, *args)
                if sql.lstrip().upper().startswith("CREATE TABLE"):
                    os._exit(3)
                return cursor

        real_connect = sqlite3.connect
        store.sqlite3.connect = lambda *a, **k: real_connect(*a, factory=DiesAfterFirstCreate, **k)
        store.ResultStore({str(db)!r})
    """)
    crashed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert crashed.returncode == 3, crashed.stderr
    assert db.exists()
    with ResultStore(db) as store:  # opens, makes the schema, takes cells
        assert store.insert(make_record())
    with ResultStore.open_existing(db) as store:
        assert store.count() == 1
