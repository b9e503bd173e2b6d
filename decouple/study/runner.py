"""Running a sweep: the missing stage-one runs of ``stage_one:`` first
(:mod:`decouple.study.stage_one_runs`), then every pending cell of the plan
through stage two on every feature file, each result stored in the results
database the moment it arrives, so that a rerun resumes where an
interrupted sweep stopped."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional, Union

from tqdm import tqdm

from decouple.errors import DecoupleError
from decouple.features import read_features
from decouple.provenance import jsonable, package_versions, utc_now
from decouple.stage_two.fit import fit_cells
from decouple.study.config import FeatureSpec, SweepConfig, load_config
from decouple.study.plan import (
    PlannedCell,
    SweepPlan,
    cell_identity,
    check_feature_files,
    plan_sweep,
    unkeyed_cells,
)
from decouple.study.stage_one_runs import Launcher, Log, StageOneSummary, plan_stage_one, run_stage_one
from decouple.study.store import CellRecord, ResultStore


class SweepInterrupted(Exception):
    """Ctrl-C during a sweep: finished cells are stored; a rerun resumes."""

    def __init__(self, done: int, total: int, db: str, *, what: str = "cells", resumes: str = "") -> None:
        self.done, self.total, self.db = done, total, db
        super().__init__(
            f"interrupted: {done} of {total} {what} are stored in {db}; "
            f"rerun the same command to run the other {total - done}{resumes}"
        )


@dataclass
class SweepSummary:
    """What a sweep did: cells in the grid, skipped as finished, run now, and
    its stage-one runs when it has ``stage_one:``."""

    db: str
    total: int
    skipped: int
    ran: int
    seconds: float
    stage_one: Optional[StageOneSummary] = None

    @property
    def failed_runs(self) -> int:
        return len(self.stage_one.failed) if self.stage_one is not None else 0

    def __str__(self) -> str:
        if self.stage_one is not None and self.stage_one.did_nothing and not self.ran:
            return (f"nothing to do: all {self.stage_one.total} stage-one runs and {self.total} cells "
                    f"are already in {self.db}")
        cells = f"{self.total} cells: {self.ran} run in {self.seconds:.1f} s, {self.skipped} already in {self.db}"
        return cells if self.stage_one is None else f"{self.stage_one}\n{cells}"


def run_sweep(
    config: Union[SweepConfig, str, "os.PathLike[str]"],
    *,
    db: Optional[str] = None,
    train_overrides: Optional[Mapping[str, Any]] = None,
    fuse: bool = True,
    progress: bool = False,
    on_result: Optional[Callable[[CellRecord], None]] = None,
    launcher: Optional[Launcher] = None,
    log: Log = print,
) -> SweepSummary:
    """Run every cell of ``config`` not yet in the database; returns a summary.

    With ``stage_one:`` its missing runs come first
    (:func:`~decouple.study.stage_one_runs.run_stage_one`: ``launcher``
    makes each, by default in this process or under torchrun on several
    GPUs; ``log`` takes their progress lines), then the cells of every
    feature file they made and of ``features:``. A failed run is listed in
    the summary and its cells left out.

    Cells of one feature file go to :func:`~decouple.stage_two.fit.fit_cells`
    together, which fuses those sharing a sampler and seed into one pass over
    the features (``fuse=False`` runs them one at a time, for benchmarks).
    Each result is written in its own transaction the moment it arrives, so
    an interruption loses only the pass in flight. Ctrl-C raises
    :class:`SweepInterrupted` after the finished cells are safe.
    ``on_result(record)`` is called with each stored :class:`CellRecord`.
    """
    if not isinstance(config, SweepConfig):
        config = load_config(config)
    stage_one, specs = None, None
    if config.stage_one is not None:
        check_feature_files(config)  # a missing listed file stops the sweep before stage one, not after
        stage_one = _run_stage_one(config, db or config.db, train_overrides, launcher, progress, log)
        specs = [spec for spec in config.feature_specs() if Path(spec.path).is_file()]
    start = time.perf_counter()  # of stage two
    plan = plan_sweep(config, db=db, train_overrides=train_overrides, specs=specs)
    total = len(plan.cells)
    bar = None
    if progress:
        bar = tqdm(total=total, initial=len(plan.finished), unit="cell", desc="sweep", dynamic_ncols=True)
    store = ResultStore(plan.db)
    writer = _CellWriter(plan, store, bar=bar, on_result=on_result)
    try:
        for spec in config.features if specs is None else specs:
            pending = [planned for planned in plan.pending if planned.spec.path == spec.path]
            if pending:
                writer.run_feature_file(spec, pending, fuse=fuse)
    except KeyboardInterrupt:
        done = sum(1 for key in store.finished_keys() if key in {planned.key for planned in plan.cells})
        raise SweepInterrupted(done, total, plan.db) from None
    finally:
        if bar is not None:
            bar.close()
        store.close()
    return SweepSummary(
        db=plan.db, total=total, skipped=len(plan.finished), ran=writer.ran, seconds=time.perf_counter() - start,
        stage_one=stage_one,
    )


def _run_stage_one(
    config: SweepConfig, db: str, train_overrides: Optional[Mapping[str, Any]], launcher: Optional[Launcher],
    progress: bool, log: Log,
) -> StageOneSummary:
    """Stage one on the sweep's device; Ctrl-C becomes :class:`SweepInterrupted`."""
    device = (train_overrides or {}).get("device") or "auto"
    try:
        return run_stage_one(config, db=db, device=device, launcher=launcher, progress=progress, log=log)
    except KeyboardInterrupt:
        plan = plan_stage_one(config, db=db)
        raise SweepInterrupted(len(plan.recorded), len(plan.runs), db, what="stage-one runs",
                               resumes="; the run in flight resumes from its last epoch") from None


def describe_plan(
    config: SweepConfig, *, db: Optional[str] = None, train_overrides: Optional[Mapping[str, Any]] = None
) -> List[str]:
    """What ``decouple sweep --dry-run`` prints: the stage-one runs to make and
    the cells to run, each with how many are done; nothing is run or written."""
    db_path = db or config.db
    lines: List[str] = []
    made_specs = None
    unmade: List[PlannedCell] = []
    if config.stage_one is not None:
        stage_one = plan_stage_one(config, db=db_path)
        done = len(stage_one.recorded) + len(stage_one.unrecorded)
        lines.append(f"stage one: {len(stage_one.runs)} runs: {done} already made, {len(stage_one.pending)} to run "
                     f"(data {config.stage_one.data}, features in {config.stage_one.features_dir})")
        lines += [f"  {run.label}" for run in stage_one.pending]
        pending_paths = {run.spec.path for run in stage_one.pending}
        made_specs = [spec for spec in config.feature_specs() if spec.path not in pending_paths]
        unmade = unkeyed_cells(config, [run.spec for run in stage_one.pending])
    plan = plan_sweep(config, db=db, train_overrides=train_overrides, specs=made_specs)
    later = f" ({len(unmade)} on feature files stage one will make)" if unmade else ""
    lines.append(f"{len(plan.cells) + len(unmade)} cells: {len(plan.finished)} already in {plan.db}, "
                 f"{len(plan.pending) + len(unmade)} to run{later}")
    lines += [f"  {planned.label}" for planned in plan.pending + unmade]
    return lines


@dataclass(frozen=True)
class _FileFacts:
    """What every record of one feature file repeats, read once per file."""

    backbone: Optional[str]
    class_names: List[str]
    train_counts: List[int]


class _CellWriter:
    """Fits a feature file's pending cells and stores each result as a
    :class:`CellRecord` the moment stage two returns it."""

    def __init__(
        self,
        plan: SweepPlan,
        store: ResultStore,
        *,
        bar: Optional[tqdm],
        on_result: Optional[Callable[[CellRecord], None]],
    ) -> None:
        self.plan = plan
        self.store = store
        self.bar = bar
        self.on_result = on_result
        self.versions = package_versions()
        self.config_hash = plan.config.config_hash
        self.ran = 0  # cells stored by this sweep

    def run_feature_file(self, spec: FeatureSpec, pending: List[PlannedCell], *, fuse: bool) -> None:
        """Fit ``pending`` (cells of feature file ``spec``) in one fused call,
        or one call per cell without ``fuse``; store each result at once."""
        feature_set = read_features(spec.path)
        facts = _FileFacts(
            backbone=spec.backbone or feature_set.backbone,
            class_names=list(feature_set.class_names),
            train_counts=[int(count) for count in feature_set.train_counts],
        )
        by_identity = {planned.identity[1:]: planned for planned in pending}

        def store_result(result: Any) -> None:
            planned = by_identity.pop(cell_identity(result.cell))
            record = self._record(result, planned, facts, wall_seconds=time.perf_counter() - pass_start)
            if self.store.insert(record):
                self.ran += 1
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix_str(planned.label, refresh=False)
            if self.on_result is not None:
                self.on_result(record)

        groups = [pending] if fuse else [[planned] for planned in pending]
        for group in groups:
            pass_start = time.perf_counter()
            fit_cells(feature_set, [planned.cell for planned in group], train=self.plan.train, on_result=store_result)
        missing = [planned.label for planned in by_identity.values()]
        if missing:
            raise DecoupleError(f"stage two returned no result for {len(missing)} cells, e.g. {missing[0]}")

    def _record(self, result: Any, planned: PlannedCell, facts: _FileFacts, *, wall_seconds: float) -> CellRecord:
        """The stored form of one stage-two result."""
        spec = planned.spec
        return CellRecord(
            cell_key=planned.key,
            config_hash=self.config_hash,
            features=spec.path,
            features_name=spec.name,
            features_sha256=self.plan.feature_sha256[spec.path],
            backbone=facts.backbone,
            tags=dict(spec.tags),
            head=result.head,
            loss=result.loss,
            sampler=result.sampler,
            seed=int(result.seed),
            params=jsonable(result.params),
            train=jsonable(dataclasses.asdict(self.plan.train)),
            class_names=facts.class_names,
            train_counts=facts.train_counts,
            metrics=jsonable(result.metrics),
            predictions=dict(result.predictions),
            fit_seconds=float(result.fit_seconds),
            versions=self.versions,
            wall_seconds=wall_seconds,
            finished_at=utc_now(),
        )
