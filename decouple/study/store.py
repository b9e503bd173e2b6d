"""The results store: one SQLite file holding every finished sweep cell.

Schema (version 2)::

    meta(key TEXT PRIMARY KEY, value TEXT)        -- format, schema_version
    cells(                                         -- one row per finished cell
        cell_id        INTEGER PRIMARY KEY,
        cell_key       TEXT UNIQUE NOT NULL,       -- sha256 of what the cell computes
        config_hash    TEXT NOT NULL,              -- sha256 of the whole validated sweep config
        features       TEXT NOT NULL,              -- feature file path as given in the config
        features_name  TEXT NOT NULL,              -- its label (config `name`, else the file stem)
        features_sha256 TEXT NOT NULL,             -- content identity of the feature file
        backbone       TEXT,
        tags           TEXT NOT NULL,              -- JSON object, config `tags` of the feature file
        head TEXT NOT NULL, loss TEXT, sampler TEXT,  -- loss / sampler NULL for ncm, knn
        seed           INTEGER NOT NULL,
        params         TEXT NOT NULL,              -- JSON: resolved params (chosen epoch, tau, ...)
        train          TEXT NOT NULL,              -- JSON: the TrainConfig used
        class_names    TEXT NOT NULL,              -- JSON list (C,)
        train_counts   TEXT NOT NULL,              -- JSON list (C,): training images per class
                                                   -- (shot groups: params.shot_groups.reference_counts
                                                   -- where the feature file had them)
        versions       TEXT NOT NULL,              -- JSON: python and package versions
        fit_seconds    REAL NOT NULL,
        wall_seconds   REAL,                       -- wall time of the fused pass that produced it
        finished_at    TEXT NOT NULL)              -- UTC ISO-8601
    metrics(                                       -- one row per cell and evaluated split
        cell_id INTEGER NOT NULL REFERENCES cells ON DELETE CASCADE,
        split TEXT NOT NULL, n INTEGER NOT NULL,
        top1 REAL, top5 REAL, macro_f1 REAL, mean_class_acc REAL,
        many REAL, medium REAL, few REAL,           -- NULL for an empty group
        per_class TEXT NOT NULL,                    -- JSON list (C,), null where the split lacks the class
        extra TEXT NOT NULL,                        -- JSON object: any further scalar metrics
        PRIMARY KEY (cell_id, split))
    split_labels(                                  -- true labels of a scored split (version 2)
        features_sha256 TEXT NOT NULL, split TEXT NOT NULL, n INTEGER NOT NULL,
        num_classes INTEGER NOT NULL, dtype TEXT NOT NULL,
        labels BLOB NOT NULL,                       -- decouple.predictions encoding, (n,)
        PRIMARY KEY (features_sha256, split))
    predictions(                                   -- ranked predictions of a cell (version 2)
        cell_id INTEGER NOT NULL REFERENCES cells ON DELETE CASCADE,
        split TEXT NOT NULL, k INTEGER NOT NULL, dtype TEXT NOT NULL,
        top BLOB NOT NULL,                          -- decouple.predictions encoding, (n, k)
        PRIMARY KEY (cell_id, split))

The per-image predictions let ``decouple export --ci`` and ``decouple
recommend`` bootstrap every label-based metric without refitting a head. A
version-1 database (no predictions) is read as it is and gains the two
tables, and version 2, the first time it is opened for writing; its old
cells keep no predictions.

A cell and its metric rows are written in one transaction, so a crash or
Ctrl-C never leaves a cell half-written; a rerun finds it either whole or
absent. Readers open the file read-only and never create it.

Stage-one runs of a sweep (``stage_one:``) have a table of their own,
``stage_one_runs`` (the columns of :class:`RunRecord`: run_key, the feature
file and its sha256, backbone, loss, sampler, profile, the settings and the
fine-tuning history as JSON, timings; a run made again replaces its row).
It is created the first time a run is recorded, without a new schema version: a database without it simply
holds no runs, and older versions of decouple read the rest as before.
"""

from __future__ import annotations

import json
import math
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Set, Tuple, Union

from decouple.errors import DecoupleError
from decouple.metrics import DEFAULT_SHOT_RULE, FEW_THRESHOLD, MANY_THRESHOLD, shot_groups
from decouple.predictions import SplitPredictions, label_dtype, pack, unpack
from decouple.provenance import jsonable, utc_now

FORMAT = "decouple-results"
SCHEMA_VERSION = 2
#: Older schema versions this version reads (and upgrades when it writes).
READABLE_VERSIONS = (1, 2)
# Metrics with a column of their own; anything else scalar goes to `extra`.
METRIC_COLUMNS = ("top1", "top5", "macro_f1", "mean_class_acc", "many", "medium", "few")

_BASE_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cells (
    cell_id INTEGER PRIMARY KEY,
    cell_key TEXT UNIQUE NOT NULL,
    config_hash TEXT NOT NULL,
    features TEXT NOT NULL,
    features_name TEXT NOT NULL,
    features_sha256 TEXT NOT NULL,
    backbone TEXT,
    tags TEXT NOT NULL,
    head TEXT NOT NULL,
    loss TEXT,
    sampler TEXT,
    seed INTEGER NOT NULL,
    params TEXT NOT NULL,
    train TEXT NOT NULL,
    class_names TEXT NOT NULL,
    train_counts TEXT NOT NULL,
    versions TEXT NOT NULL,
    fit_seconds REAL NOT NULL,
    wall_seconds REAL,
    finished_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS metrics (
    cell_id INTEGER NOT NULL REFERENCES cells(cell_id) ON DELETE CASCADE,
    split TEXT NOT NULL,
    n INTEGER NOT NULL,
    top1 REAL, top5 REAL, macro_f1 REAL, mean_class_acc REAL,
    many REAL, medium REAL, few REAL,
    per_class TEXT NOT NULL,
    extra TEXT NOT NULL,
    PRIMARY KEY (cell_id, split)
);
CREATE INDEX IF NOT EXISTS cells_method ON cells (features_name, head, loss, sampler, seed);
"""
# Added by schema version 2.
_PREDICTION_TABLES = """
CREATE TABLE IF NOT EXISTS split_labels (
    features_sha256 TEXT NOT NULL,
    split TEXT NOT NULL,
    n INTEGER NOT NULL,
    num_classes INTEGER NOT NULL,
    dtype TEXT NOT NULL,
    labels BLOB NOT NULL,
    PRIMARY KEY (features_sha256, split)
);
CREATE TABLE IF NOT EXISTS predictions (
    cell_id INTEGER NOT NULL REFERENCES cells(cell_id) ON DELETE CASCADE,
    split TEXT NOT NULL,
    k INTEGER NOT NULL,
    dtype TEXT NOT NULL,
    top BLOB NOT NULL,
    PRIMARY KEY (cell_id, split)
);
"""
_SCHEMA = _BASE_TABLES + _PREDICTION_TABLES
# Made on the first recorded stage-one run (see the module docstring).
_RUN_TABLE = """
CREATE TABLE IF NOT EXISTS stage_one_runs (
    run_key TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    features TEXT NOT NULL,
    features_sha256 TEXT NOT NULL,
    backbone TEXT NOT NULL,
    loss TEXT NOT NULL,
    sampler TEXT NOT NULL,
    profile TEXT NOT NULL,
    settings TEXT NOT NULL,
    history TEXT NOT NULL,
    seconds REAL,
    embed_images INTEGER,
    embed_seconds REAL,
    world_size INTEGER,
    versions TEXT NOT NULL,
    finished_at TEXT NOT NULL
)
"""

PathLike = Union[str, "Path"]
#: (rule, many_threshold, few_threshold) of a cell's shot groups.
ShotRule = Tuple[str, Optional[int], Optional[int]]


@dataclass
class CellRecord:
    """One finished cell as stored: identity, settings, metrics per split.

    ``metrics`` maps split -> {"n", "top1", ..., "few", "per_class", plus any
    extra scalar metric}; the shape of ``decouple head --json``'s "metrics".
    ``predictions`` maps split -> its per-image predictions
    (:mod:`decouple.predictions`): empty for cells stored before version 2,
    and as read unless asked for (``ResultStore.records(predictions=True)``).
    """

    cell_key: str
    config_hash: str
    features: str
    features_name: str
    features_sha256: str
    head: str
    loss: Optional[str]
    sampler: Optional[str]
    seed: int
    params: Dict[str, Any]
    train: Dict[str, Any]
    class_names: List[str]
    train_counts: List[int]
    metrics: Dict[str, Dict[str, Any]]
    fit_seconds: float
    backbone: Optional[str] = None
    tags: Dict[str, Any] = field(default_factory=dict)
    versions: Dict[str, str] = field(default_factory=dict)
    wall_seconds: Optional[float] = None
    finished_at: str = ""
    predictions: Dict[str, SplitPredictions] = field(default_factory=dict, repr=False)

    def shot_rule(self) -> "ShotRule":
        """(rule, many_threshold, few_threshold) the cell's shot groups were
        made by (thresholds None under "thirds", which does not use them);
        records stored before the rule was a setting used the thresholds."""
        train = self.train or {}
        rule = train.get("groups", DEFAULT_SHOT_RULE)
        if rule != "thresholds":
            return rule, None, None
        return rule, int(train.get("many_threshold", MANY_THRESHOLD)), int(train.get("few_threshold", FEW_THRESHOLD))

    @property
    def group_counts(self) -> List[int]:
        """The counts (C,) the cell's shot groups came from: the reference profile's
        (recorded in ``params["shot_groups"]`` where the feature file had them), else
        its training counts."""
        reference = (self.params or {}).get("shot_groups", {}).get("reference_counts")
        return self.train_counts if reference is None else reference

    def shot_groups(self) -> Dict[str, Any]:
        """The cell's many / medium / few class indices (:func:`decouple.metrics.shot_groups`
        of :attr:`group_counts`)."""
        rule, many, few = self.shot_rule()
        thresholds = {} if many is None else {"many_threshold": many, "few_threshold": few}
        return shot_groups(self.group_counts, rule=rule, **thresholds)

    @property
    def method(self) -> Dict[str, Any]:
        """The fields that name what was trained (no seed)."""
        return {
            "features": self.features_name,
            "head": self.head,
            "loss": self.loss,
            "sampler": self.sampler,
        }

    def to_json(self) -> Dict[str, Any]:
        """A JSON-ready dict; :func:`CellRecord.from_json` reads it back equal."""
        return {
            "cell_key": self.cell_key,
            "config_hash": self.config_hash,
            "features": self.features,
            "features_name": self.features_name,
            "features_sha256": self.features_sha256,
            "backbone": self.backbone,
            "tags": self.tags,
            "head": self.head,
            "loss": self.loss,
            "sampler": self.sampler,
            "seed": self.seed,
            "params": self.params,
            "train": self.train,
            "class_names": self.class_names,
            "train_counts": self.train_counts,
            "versions": self.versions,
            "fit_seconds": self.fit_seconds,
            "wall_seconds": self.wall_seconds,
            "finished_at": self.finished_at,
            "metrics": self.metrics,
            **({"predictions": {split: p.to_json() for split, p in self.predictions.items()}}
               if self.predictions else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "CellRecord":
        data = dict(data)
        data["predictions"] = {
            split: SplitPredictions.from_json(value) for split, value in (data.get("predictions") or {}).items()
        }
        return cls(**data)


def _dumps(value: Any) -> str:
    # NaN is kept for allow_nan=False to refuse: a NaN slipping into a metric is a bug to surface, not to store.
    return json.dumps(jsonable(value, nonfinite_to_none=False), sort_keys=True, allow_nan=False)


def _scalar(value: Any) -> Optional[float]:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _cell_row(record: CellRecord) -> Tuple[Any, ...]:
    """A record's values for the columns of the cells table, in schema order."""
    return (
        record.cell_key,
        record.config_hash,
        record.features,
        record.features_name,
        record.features_sha256,
        record.backbone,
        _dumps(record.tags),
        record.head,
        record.loss,
        record.sampler,
        int(record.seed),
        _dumps(record.params),
        _dumps(record.train),
        _dumps(list(record.class_names)),
        _dumps([int(count) for count in record.train_counts]),
        _dumps(record.versions),
        float(record.fit_seconds),
        None if record.wall_seconds is None else float(record.wall_seconds),
        record.finished_at or utc_now(),
    )


def _metric_row(cell_id: int, split: str, values: Mapping[str, Any]) -> Tuple[Any, ...]:
    """One split's values for the columns of the metrics table; scalars
    without a column of their own go to ``extra``."""
    extra = {
        key: value
        for key, value in values.items()
        if key not in METRIC_COLUMNS and key not in ("n", "per_class")
    }
    return (
        cell_id,
        split,
        int(values["n"]),
        *(_scalar(values.get(name)) for name in METRIC_COLUMNS),
        _dumps([_scalar(value) for value in values.get("per_class", [])]),
        _dumps(extra),
    )


@dataclass
class RunRecord:
    """One stage-one run of a sweep as stored: what it made, how, and how fast.

    ``settings``: the run's settings and the feature file's resolved extract
    config; ``history``: its fine-tuning epochs (loss, images/s, lr, seconds).
    ``seconds`` (the whole run), ``embed_images`` and ``embed_seconds`` (the
    embedding of every split) are None for a file found made, not run now.
    """

    run_key: str
    name: str
    features: str
    features_sha256: str
    backbone: str
    loss: str
    sampler: str
    profile: str
    settings: Dict[str, Any]
    history: List[Dict[str, Any]]
    seconds: Optional[float] = None
    embed_images: Optional[int] = None
    embed_seconds: Optional[float] = None
    world_size: Optional[int] = None
    versions: Dict[str, str] = field(default_factory=dict)
    finished_at: str = ""


_RUN_COLUMNS = tuple(RunRecord.__dataclass_fields__)
_RUN_JSON_COLUMNS = ("settings", "history", "versions")


class ResultStore:
    """The SQLite results database of a sweep.

    ``ResultStore(path)`` opens or creates it for writing;
    ``ResultStore.open_existing(path)`` opens an existing one read-only and
    says plainly when there is none.
    """

    def __init__(self, path: PathLike, *, _readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = _readonly
        if _readonly:
            uri = f"file:{self.path.resolve().as_posix()}?mode=ro"
            self._conn = sqlite3.connect(uri, uri=True, timeout=30)
        else:
            if self.path.parent and not self.path.parent.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(str(self.path), timeout=30)
        self._conn.execute("PRAGMA foreign_keys = ON")
        try:
            self._check_or_create()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise DecoupleError(
                f"{self.path}: cannot be read as a decouple results database ({exc})"
            ) from None

    @classmethod
    def open_existing(cls, path: PathLike) -> "ResultStore":
        """Open a results database read-only; a missing file is a DecoupleError."""
        path = Path(path)
        if not path.exists():
            raise DecoupleError(
                f"{path}: no such results database; run `decouple sweep CONFIG.yaml` first"
            )
        if path.is_dir():
            raise DecoupleError(f"{path}: is a folder; expected a results database file")
        return cls(path, _readonly=True)

    def _check_or_create(self) -> None:
        tables = {
            row[0]
            for row in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        if "meta" in tables:
            meta = dict(self._conn.execute("SELECT key, value FROM meta"))
            if meta.get("format") != FORMAT:
                raise DecoupleError(
                    f"{self.path}: meta format must be {FORMAT!r}; got {meta.get('format')!r}"
                )
            version = int(meta.get("schema_version", -1))
            if version not in READABLE_VERSIONS:
                raise DecoupleError(
                    f"{self.path}: results schema version must be one of "
                    f"{', '.join(map(str, READABLE_VERSIONS))}; got {meta.get('schema_version')}"
                    + (" (made by a newer decouple; upgrade it)" if version > SCHEMA_VERSION else "")
                )
            if version < SCHEMA_VERSION and not self.readonly:
                self._upgrade()
            return
        if tables:
            raise DecoupleError(
                f"{self.path}: is an SQLite file but not a decouple results database "
                f"(tables: {', '.join(sorted(tables))})"
            )
        if self.readonly:
            return  # an empty file: reads find no cells
        # One transaction: sqlite3 would commit each CREATE on its own, so a
        # crash between them would leave tables without the meta row, a file
        # refused ever after. BEGIN IMMEDIATE also takes the write lock, so a
        # second process creating the same database waits, then finds it made.
        with self._conn:  # COMMIT, or ROLLBACK on any exception
            self._conn.execute("BEGIN IMMEDIATE")
            if not self._conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone():
                for statement in _SCHEMA.strip().split(";"):
                    if statement.strip():
                        self._conn.execute(statement)
                self._conn.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [("format", FORMAT), ("schema_version", str(SCHEMA_VERSION))],
                )
                return
        self._check_or_create()  # another process made it meanwhile: check what it made

    def _upgrade(self) -> None:
        """Version 1 -> 2: add the prediction tables, in one transaction."""
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            for statement in _PREDICTION_TABLES.strip().split(";"):
                if statement.strip():
                    self._conn.execute(statement)
            self._conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))

    def _has_table(self, name: str) -> bool:
        return bool(
            self._conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone()
        )

    # -- context manager ---------------------------------------------------------

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- writing ---------------------------------------------------------------

    def insert(self, record: CellRecord) -> bool:
        """Write one cell and its metric rows in a single transaction.

        Returns False (and writes nothing) when ``record.cell_key`` is already
        stored. An exception at any point rolls the whole cell back.
        """
        if self.readonly:
            raise DecoupleError(f"{self.path}: opened read-only")
        with self._conn:  # BEGIN ... COMMIT, or ROLLBACK on any exception
            cursor = self._conn.execute(
                """INSERT OR IGNORE INTO cells (
                    cell_key, config_hash, features, features_name, features_sha256,
                    backbone, tags, head, loss, sampler, seed, params, train,
                    class_names, train_counts, versions, fit_seconds, wall_seconds, finished_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                _cell_row(record),
            )
            if cursor.rowcount == 0:
                return False
            cell_id = cursor.lastrowid
            for split, values in record.metrics.items():
                self._conn.execute(
                    """INSERT INTO metrics (cell_id, split, n, top1, top5, macro_f1,
                        mean_class_acc, many, medium, few, per_class, extra)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    _metric_row(cell_id, split, values),
                )
            for split, predicted in record.predictions.items():
                self._insert_predictions(cell_id, record.features_sha256, split, predicted)
        return True

    def _insert_predictions(self, cell_id: int, features_sha256: str, split: str, predicted: SplitPredictions) -> None:
        """One split's predictions of a cell; its labels once per feature file
        (the same sha256 has the same labels)."""
        dtype = label_dtype(predicted.num_classes)
        labels = pack(predicted.labels, dtype)
        stored = self._conn.execute(
            "SELECT labels FROM split_labels WHERE features_sha256 = ? AND split = ?", (features_sha256, split)
        ).fetchone()
        if stored is None:
            self._conn.execute(
                """INSERT INTO split_labels (features_sha256, split, n, num_classes, dtype, labels)
                   VALUES (?, ?, ?, ?, ?, ?)""",
                (features_sha256, split, len(predicted.labels), predicted.num_classes, dtype, labels),
            )
        elif bytes(stored[0]) != labels:
            raise DecoupleError(
                f"{self.path}: the {split} labels of feature file sha256 {features_sha256[:12]} differ from those "
                f"stored with its earlier cells; the same file cannot have other labels"
            )
        self._conn.execute(
            "INSERT INTO predictions (cell_id, split, k, dtype, top) VALUES (?, ?, ?, ?, ?)",
            (cell_id, split, predicted.top.shape[1], dtype, pack(predicted.top, dtype)),
        )

    # -- reading ---------------------------------------------------------------

    def finished_keys(self) -> Set[str]:
        """cell_key of every stored cell."""
        return {row[0] for row in self._conn.execute("SELECT cell_key FROM cells")} if self._has_cells() else set()

    def _has_cells(self) -> bool:
        return self._has_table("cells")

    def count(self) -> int:
        if not self._has_cells():
            return 0
        return int(self._conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0])

    def records(
        self,
        *,
        features: Optional[Iterable[str]] = None,
        heads: Optional[Iterable[str]] = None,
        losses: Optional[Iterable[str]] = None,
        samplers: Optional[Iterable[str]] = None,
        seeds: Optional[Iterable[int]] = None,
        splits: Optional[Iterable[str]] = None,
        predictions: bool = False,
    ) -> List[CellRecord]:
        """Stored cells, oldest first, optionally filtered.

        ``features`` matches the features name or path; ``losses`` /
        ``samplers`` may hold ``"none"`` for the cells without one (ncm, knn);
        ``splits`` limits which splits each record carries; ``predictions``
        reads each split's per-image predictions too (none for cells stored
        without them).
        """
        if not self._has_cells():
            return []
        condition, args = _cells_condition(
            features=features, heads=heads, losses=losses, samplers=samplers, seeds=seeds
        )
        splits = None if splits is None else list(splits)
        metric_sql, metric_args = _metrics_query(condition, args, splits)
        self._conn.row_factory = sqlite3.Row
        try:
            # Two queries whatever the number of cells: the cells, then all their metrics.
            cells = self._conn.execute(f"SELECT * FROM cells{condition} ORDER BY cell_id", args).fetchall()
            metrics: Dict[int, Dict[str, Dict[str, Any]]] = {}
            for metric_row in self._conn.execute(metric_sql + " ORDER BY cell_id, rowid", metric_args):
                metrics.setdefault(metric_row["cell_id"], {})[metric_row["split"]] = _metric_values(metric_row)
            records = [_record_from_row(row, metrics.get(row["cell_id"], {})) for row in cells]
            if predictions:
                by_id = {row["cell_id"]: record for row, record in zip(cells, records)}
                for cell_id, split, predicted in self._predictions(condition, args, splits):
                    by_id[cell_id].predictions[split] = predicted
            return records
        finally:
            self._conn.row_factory = None

    def _predictions(
        self, cells_condition: str, cells_args: List[Any], splits: Optional[List[str]]
    ) -> Iterator[Tuple[int, str, SplitPredictions]]:
        """(cell_id, split, predictions) of the cells ``cells_condition``
        selects, limited to ``splits`` if given; labels are decoded once per
        feature file and split."""
        if not self._has_table("predictions"):
            return
        where = [f"p.cell_id IN (SELECT cell_id FROM cells{cells_condition})"] if cells_condition else []
        args = list(cells_args)
        if splits is not None:
            where.append(f"p.split IN ({', '.join('?' * len(splits))})" if splits else "0")
            args.extend(splits)
        query = (
            "SELECT p.cell_id, p.split, p.k, p.dtype AS top_dtype, p.top, l.n, l.num_classes, l.dtype, "
            "l.labels, l.features_sha256 FROM predictions p JOIN cells c ON c.cell_id = p.cell_id "
            "JOIN split_labels l ON l.features_sha256 = c.features_sha256 AND l.split = p.split"
            + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY p.cell_id, p.split"
        )
        labels: Dict[Tuple[str, str], Any] = {}
        for row in self._conn.execute(query, args):
            key = (row["features_sha256"], row["split"])
            if key not in labels:
                labels[key] = unpack(row["labels"], row["dtype"], (row["n"],))
            true = labels[key]
            top = unpack(row["top"], row["top_dtype"], (len(true), row["k"]))
            yield row["cell_id"], row["split"], SplitPredictions(true, top, int(row["num_classes"]))

    # -- stage-one runs ----------------------------------------------------------

    def insert_run(self, record: RunRecord) -> bool:
        """Record one stage-one run; False (nothing written) when its run_key is
        stored with the same feature file sha256. A run whose file was made
        again (another sha256) replaces its record: settings, history, timings."""
        if self.readonly:
            raise DecoupleError(f"{self.path}: opened read-only")
        # A diverged epoch's NaN loss is history, not a bug: stored as null.
        values = [json.dumps(jsonable(getattr(record, name)), sort_keys=True) if name in _RUN_JSON_COLUMNS
                  else getattr(record, name) for name in _RUN_COLUMNS]
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")  # the check and the write see one state of the table
            self._conn.execute(_RUN_TABLE)
            stored = self._conn.execute(
                "SELECT features_sha256 FROM stage_one_runs WHERE run_key = ?", (record.run_key,)
            ).fetchone()
            if stored is not None and stored[0] == record.features_sha256:
                return False
            self._conn.execute(
                f"INSERT OR REPLACE INTO stage_one_runs ({', '.join(_RUN_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(_RUN_COLUMNS))})", values,
            )
        return True

    def runs(self) -> List[RunRecord]:
        """Every recorded stage-one run, oldest first; none in a database without the table."""
        if not self._has_table("stage_one_runs"):
            return []
        rows = self._conn.execute(f"SELECT {', '.join(_RUN_COLUMNS)} FROM stage_one_runs ORDER BY rowid")
        return [
            RunRecord(**{name: json.loads(value) if name in _RUN_JSON_COLUMNS else value
                         for name, value in zip(_RUN_COLUMNS, row)})
            for row in rows
        ]


def _cells_condition(
    *,
    features: Optional[Iterable[str]],
    heads: Optional[Iterable[str]],
    losses: Optional[Iterable[str]],
    samplers: Optional[Iterable[str]],
    seeds: Optional[Iterable[int]],
) -> Tuple[str, List[Any]]:
    """The " WHERE ..." clause (or "") selecting the cells of
    :meth:`ResultStore.records`'s filters, and its arguments."""
    where: List[str] = []
    args: List[Any] = []

    def member(column: str, values: Optional[Iterable[Any]], *, nullable: bool = False) -> None:
        if values is None:
            return
        values = list(values)
        wanted = [value for value in values if not (nullable and value in (None, "none"))]
        clauses = []
        if wanted:
            clauses.append(f"{column} IN ({', '.join('?' * len(wanted))})")
            args.extend(wanted)
        if nullable and len(wanted) < len(values):
            clauses.append(f"{column} IS NULL")
        where.append("(" + " OR ".join(clauses or ["0"]) + ")")

    if features is not None:
        names = list(features)
        where.append(
            f"(features_name IN ({', '.join('?' * len(names))}) "
            f"OR features IN ({', '.join('?' * len(names))}))"
        )
        args.extend(names + names)
    member("head", heads)
    member("loss", losses, nullable=True)
    member("sampler", samplers, nullable=True)
    member("seed", seeds)
    return (" WHERE " + " AND ".join(where) if where else ""), args


def _metrics_query(cells_condition: str, cells_args: List[Any], splits: Optional[List[str]]) -> Tuple[str, List[Any]]:
    """The query of every metric row of the cells ``cells_condition`` selects,
    limited to ``splits`` if given, and its arguments."""
    metric_where = [f"cell_id IN (SELECT cell_id FROM cells{cells_condition})"] if cells_condition else []
    metric_args = list(cells_args)
    if splits is not None:
        metric_where.append(f"split IN ({', '.join('?' * len(splits))})" if splits else "0")
        metric_args.extend(splits)
    metric_sql = "SELECT * FROM metrics"
    if metric_where:
        metric_sql += " WHERE " + " AND ".join(metric_where)
    return metric_sql, metric_args


def _metric_values(row: sqlite3.Row) -> Dict[str, Any]:
    """One split's metrics of a stored cell, as CellRecord.metrics holds them."""
    values: Dict[str, Any] = {"n": row["n"]}
    for name in METRIC_COLUMNS:
        values[name] = row[name]
    values["per_class"] = json.loads(row["per_class"])
    values.update(json.loads(row["extra"]))
    return values


def _record_from_row(row: sqlite3.Row, metrics: Dict[str, Dict[str, Any]]) -> CellRecord:
    """A CellRecord from its row of the cells table and its metrics."""
    return CellRecord(
        cell_key=row["cell_key"],
        config_hash=row["config_hash"],
        features=row["features"],
        features_name=row["features_name"],
        features_sha256=row["features_sha256"],
        backbone=row["backbone"],
        tags=json.loads(row["tags"]),
        head=row["head"],
        loss=row["loss"],
        sampler=row["sampler"],
        seed=row["seed"],
        params=json.loads(row["params"]),
        train=json.loads(row["train"]),
        class_names=json.loads(row["class_names"]),
        train_counts=json.loads(row["train_counts"]),
        versions=json.loads(row["versions"]),
        fit_seconds=row["fit_seconds"],
        wall_seconds=row["wall_seconds"],
        finished_at=row["finished_at"],
        metrics=metrics,
    )


def load_records(path: PathLike, **filters: Any) -> List[CellRecord]:
    """Every stored cell of an existing database (read-only), filtered as
    :meth:`ResultStore.records`; a missing or empty database is a DecoupleError."""
    with ResultStore.open_existing(path) as store:
        if store.count() == 0:
            raise DecoupleError(
                f"{path}: the results database holds no finished cells yet; "
                f"run `decouple sweep CONFIG.yaml` first"
            )
        records = store.records(**filters)
    return records
