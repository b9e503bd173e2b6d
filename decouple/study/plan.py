"""Planning a sweep: every cell of the grid with its resume key, and which of
them the results database already holds.

A cell's key hashes the feature file (path as given and content sha256),
head, loss, sampler, seed, the cell's resolved params and the train settings
(not the device), so a changed setting never reuses an old result and a
rerun skips exactly the finished cells.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from decouple.errors import FeatureFileError
from decouple.features import read_train_counts
from decouple.provenance import file_sha256
from decouple.stage_two.cells import Cell
from decouple.stage_two.config import TrainConfig
from decouple.stage_two.heads import HEADS
from decouple.study.config import FeatureSpec, SweepConfig, check_cells, sha256_json
from decouple.study.grid import train_identity
from decouple.study.store import ResultStore
from decouple.study.yaml_lines import ConfigPlaces


@dataclass(frozen=True)
class PlannedCell:
    """One cell of a sweep with its resume key."""

    spec: FeatureSpec
    cell: Cell  # validated
    key: str
    #: The settings ``vary:`` gave this cell ("max_norm=0.5, weight_decay=0.005"), "" for none.
    varied: str = ""

    @property
    def identity(self) -> Tuple[str, str, Optional[str], Optional[str], int, str]:
        """(feature file, head, loss, sampler, seed, settings as given): one
        cell of a sweep (``vary:`` gives one method several settings)."""
        return (self.spec.path, *cell_identity(self.cell))

    @property
    def label(self) -> str:
        parts = [self.spec.name, self.cell.head, self.cell.loss, self.cell.sampler, f"seed {self.cell.seed}"]
        text = " / ".join(part for part in parts if part)
        return f"{text} ({self.varied})" if self.varied else text


@dataclass
class SweepPlan:
    """Every cell of a sweep, which of them the database already holds, and
    the settings they are trained with."""

    config: SweepConfig
    db: str
    train: TrainConfig
    cells: List[PlannedCell]
    finished: List[PlannedCell]
    pending: List[PlannedCell]
    feature_sha256: Dict[str, str]


def varied_text(config: SweepConfig, cell: Cell) -> str:
    """The settings of ``vary:`` that reach ``cell``, as "key=value, ..."."""
    texts = []
    for method, settings in config.vary.items():
        given = dict(cell.params).get(method, {})
        texts.extend(f"{key}={json.dumps(given[key])}" for key in settings if key in given)
    return ", ".join(texts)


def cell_identity(cell: Cell) -> Tuple[str, Optional[str], Optional[str], int, str]:
    """(head, loss, sampler, seed, settings as canonical JSON) of a validated cell."""
    params = json.dumps({name: dict(values) for name, values in dict(cell.params).items()}, sort_keys=True,
                        default=str)
    return (cell.head, cell.loss, cell.sampler, int(cell.seed), params)


def cell_key(cell: Cell, spec: FeatureSpec, features_sha256: str, train: TrainConfig) -> str:
    """The resume key of one cell: what it computes, nothing about how fast."""
    train_fields = train_identity(cell.head, dataclasses.asdict(train))
    return sha256_json(
        {
            "features": spec.path,
            "features_sha256": features_sha256,
            "head": cell.head,
            "loss": cell.loss,
            "sampler": cell.sampler,
            "seed": cell.seed,
            "params": {name: dict(values) for name, values in dict(cell.params).items()},
            "train": train_fields,
        }
    )


def check_feature_files(config: SweepConfig) -> None:
    """Every feature file must exist before the first cell runs."""
    places = ConfigPlaces(config.source, dict(config.lines))
    for index, spec in enumerate(config.features):
        path = Path(spec.path)
        if not path.exists():
            raise places.error(
                ("features", index), f"{spec.path}: no such feature file (make it with `decouple extract`)",
                FeatureFileError,
            )
        if not path.is_file():
            raise places.error(("features", index), f"{spec.path}: is not a file", FeatureFileError)


def unkeyed_cells(config: SweepConfig, specs: Sequence[FeatureSpec]) -> List[PlannedCell]:
    """The cells of feature files not made yet (a dry run's stage-one files), without keys."""
    return [PlannedCell(spec=spec, cell=cell, key="", varied=varied_text(config, cell))
            for spec, cell in config.cells(specs)]


def plan_sweep(
    config: SweepConfig,
    *,
    db: Optional[str] = None,
    train_overrides: Optional[Mapping[str, Any]] = None,
    specs: Optional[Sequence[FeatureSpec]] = None,
) -> SweepPlan:
    """Check the feature files, key every cell and look up the finished ones.

    ``specs``: the feature files to plan, by default every one of the config
    (:meth:`~decouple.study.config.SweepConfig.feature_specs`; stage one's
    must have been made by then)."""
    check_feature_files(config)
    specs = config.feature_specs() if specs is None else tuple(specs)
    unmade = [spec.path for spec in specs if not Path(spec.path).is_file()]
    if unmade:
        raise FeatureFileError(f"{unmade[0]}: no such feature file yet; `decouple sweep` makes it in stage one")
    train = config.train_config(**dict(train_overrides or {}))
    places = ConfigPlaces(config.source, dict(config.lines))
    for spec in specs:
        check_cells(places, config, class_counts=read_train_counts(spec.path), features=spec.path, train=train)
        for head in config.heads:
            HEADS.get(head).check_file(spec.path)
    db_path = db or config.db
    hashes = {spec.path: file_sha256(spec.path) for spec in specs}
    cells = [
        PlannedCell(spec=spec, cell=cell, key=cell_key(cell, spec, hashes[spec.path], train),
                    varied=varied_text(config, cell))
        for spec, cell in config.cells(specs)
    ]
    finished_keys = set()
    if Path(db_path).exists():
        with ResultStore.open_existing(db_path) as store:
            finished_keys = store.finished_keys()
    finished = [planned for planned in cells if planned.key in finished_keys]
    pending = [planned for planned in cells if planned.key not in finished_keys]
    return SweepPlan(
        config=config, db=db_path, train=train, cells=cells, finished=finished, pending=pending,
        feature_sha256=hashes,
    )
