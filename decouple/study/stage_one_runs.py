"""Stage one from a sweep config: every run of ``stage_one:`` made and recorded.

Each (backbone, loss, sampler, profile) run fine-tunes and embeds through
:func:`~decouple.stage_one.extract.run_extract` with ``resume``, so an
interrupted run continues from its last epoch's checkpoint, and writes one
feature file named from its settings (:class:`~decouple.study.config.StageOneRun`).
A run whose file exists is not run again. Each run is recorded in the
results database (:class:`~decouple.study.store.RunRecord`): its settings,
its fine-tuning history, its feature file's sha256 and its throughput.

The data are read as given, an archive unpacked once into
``<features_dir>/data/`` (:func:`~decouple.stage_one.sources.unpack_archive`),
and ``test_per_class`` caps each class of the data's own test split through
a manifest written there too. Per-class settings are checked against the
data's classes before the first run; a run that fails is reported and the
others go on. On several GPUs each run is ``torchrun --nproc_per_node=N
decouple extract ...`` (:class:`TorchrunLauncher`), as ``decouple extract``
is launched by hand.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from decouple.errors import DataError, DecoupleError, first_line
from decouple.features import read_attrs
from decouple.provenance import file_sha256, package_versions, utc_now
from decouple.stage_one.extract import ExtractConfig, ExtractResult, run_extract
from decouple.stage_one.manifest import Manifest, save_manifest
from decouple.stage_one.sources import SourceData, archive_suffix, load_source, unpack_archive
from decouple.study.config import (
    StageOneConfig,
    StageOneRun,
    SweepConfig,
    check_cells,
    check_stage_one_counts,
)
from decouple.study.store import ResultStore, RunRecord
from decouple.study.yaml_lines import ConfigPlaces

Log = Callable[[str], None]
#: Makes one run's feature file: (extract config, log) -> its result.
Launcher = Callable[[ExtractConfig, Log], ExtractResult]
#: Where unpacked archives and capped manifests go, under features_dir.
DATA_CACHE = "data"


@dataclass
class StageOnePlan:
    """The runs of ``stage_one:``: made and recorded, made but not recorded
    (a crash between the two, or another database), and still to run."""

    runs: List[StageOneRun]
    recorded: List[StageOneRun]
    unrecorded: List[StageOneRun]
    pending: List[StageOneRun]


@dataclass
class StageOneSummary:
    """What stage one did: runs in the grid, run now, found made, failed."""

    total: int
    ran: int = 0
    recorded: int = 0  # recorded now: the runs run now and files found made earlier
    already: int = 0  # made and recorded before
    failed: List[Tuple[str, str]] = field(default_factory=list)  # (run name, reason)
    seconds: float = 0.0

    @property
    def did_nothing(self) -> bool:
        return not self.ran and not self.recorded and not self.failed

    def __str__(self) -> str:
        text = f"stage one: {self.total} runs: {self.ran} run in {self.seconds:.1f} s, {self.already} already made"
        if self.recorded > self.ran:
            text += f", {self.recorded - self.ran} found made and recorded"
        if self.failed:
            text += f"; {len(self.failed)} failed: " + "; ".join(f"{name} ({reason})" for name, reason in self.failed)
        return text


def plan_stage_one(config: SweepConfig, *, db: str) -> StageOnePlan:
    """Which runs of ``config.stage_one`` are made (their feature file exists)
    and recorded in ``db``."""
    runs = config.stage_one.runs() if config.stage_one is not None else []
    keys = set()
    if Path(db).exists():
        with ResultStore.open_existing(db) as store:
            keys = {record.run_key for record in store.runs()}
    made = [run for run in runs if Path(run.spec.path).is_file()]
    return StageOnePlan(
        runs=runs,
        recorded=[run for run in made if run.key in keys],
        unrecorded=[run for run in made if run.key not in keys],
        pending=[run for run in runs if not Path(run.spec.path).is_file()],
    )


# --------------------------------------------------------------------------- data


def prepare_data(config: SweepConfig, places: ConfigPlaces) -> str:
    """The path the runs read, after every per-class setting is checked
    against its classes (:func:`check_data`): ``data`` as given, an archive
    unpacked once, and with ``test_per_class`` a manifest of it whose test
    split keeps that many images per class."""
    stage_one = config.stage_one
    data = Path(stage_one.data)
    if not data.exists():
        raise places.error(("stage_one", "data"), f"{data}: no such image folder, manifest or archive", DataError)
    cache = Path(stage_one.features_dir) / DATA_CACHE
    try:
        if archive_suffix(data) and data.is_file():
            data = unpack_archive(data, cache)
        source = load_source(data)
    except DataError as exc:
        raise places.error(("stage_one", "data"), str(exc).replace("--data ", "", 1), DataError) from None
    check_data(config, source, places)
    if stage_one.test_per_class is not None:
        data = capped_test_manifest(source, stage_one.test_per_class, seed=stage_one.seed, folder=cache,
                                    places=places)
    return str(data)


def capped_test_manifest(
    source: SourceData, per_class: int, *, seed: int, folder: Path, places: ConfigPlaces
) -> Path:
    """A manifest (path,label,split) of ``source`` whose test split keeps
    ``per_class`` images of each class, chosen by ``seed``; written
    atomically to ``folder``, named from the source's location and the cap."""
    data = Path(source.location)
    if "test" not in source.splits:
        raise places.error(
            ("stage_one", "test_per_class"),
            f"{data}: has no test split of its own to cap (expected ROOT/train|test/<class> folders or a "
            f"manifest with a split column)", DataError,
        )
    test = source.splits["test"]
    rng = np.random.default_rng([seed, 7])
    kept = [rng.permutation(np.flatnonzero(test.labels == c))[:per_class] for c in range(len(source.class_names))]
    splits = dict(source.splits)
    splits["test"] = test.subset(np.sort(np.concatenate(kept)))
    where = hashlib.sha256(os.path.abspath(data).encode("utf-8")).hexdigest()[:8]
    path = folder / f"{data.name}-{where}-test{per_class}-seed{seed}.csv"
    folder.mkdir(parents=True, exist_ok=True)
    return save_manifest(Manifest(list(source.class_names), splits, {}), path)


def check_data(config: SweepConfig, source: SourceData, places: ConfigPlaces) -> None:
    """Every per-class setting of the stage-one losses and of the stage-two
    grid against the classes of ``source``, before the first run."""
    pool = source.splits.get("train", source.splits.get("all"))
    counts = np.bincount(pool.labels, minlength=len(source.class_names))
    check_stage_one_counts(places, config.stage_one, counts, data=config.stage_one.data)
    check_cells(places, config, class_counts=counts, features=config.stage_one.data)


# --------------------------------------------------------------------------- launching


def run_in_process(config: ExtractConfig, log: Log) -> ExtractResult:
    """One run in this process (one device)."""
    return run_extract(config, log=log)


# ExtractConfig, SplitOptions and FinetuneConfig fields named otherwise as `decouple extract` options.
_OPTION_NAMES = {"check_images": "check", "loss_params": "loss-param", "sampler_params": "sampler-param",
                 "run": "name"}
# Boolean options that are a flag without a --no- form.
_PLAIN_FLAGS = ("pretrained", "strict", "resume")


def extract_argv(config: ExtractConfig) -> List[str]:
    """The ``decouple extract`` options that give ``config``."""
    values: Dict[str, Any] = {item.name: getattr(config, item.name) for item in dataclasses.fields(config)}
    values.update(dataclasses.asdict(values.pop("split")))
    values.update(dataclasses.asdict(values.pop("finetune")))  # its seed is the split's
    argv: List[str] = []
    for name, value in values.items():
        option = "--" + _OPTION_NAMES.get(name, name).replace("_", "-")
        if isinstance(value, bool):
            if name not in _PLAIN_FLAGS:
                argv.append(option if value else "--no-" + option[2:])
            elif value:
                argv.append(option)
        elif isinstance(value, dict):
            argv += [part for key, setting in value.items() for part in (option, f"{key}={json.dumps(setting)}")]
        elif isinstance(value, (tuple, list)):
            argv += [option, ",".join(str(item) for item in value)] if value else []
        elif value is not None:
            argv += [option, str(value)]
    return argv


@dataclass
class TorchrunLauncher:
    """Each run as ``torchrun --standalone --nproc_per_node=N decouple extract ...``:
    DistributedDataParallel over N local GPUs, rank 0 writing the file."""

    nproc: int
    #: What runs ``decouple`` under torchrun: its script (default: the one beside this Python).
    command: Sequence[str] = ()

    def __call__(self, config: ExtractConfig, log: Log) -> ExtractResult:
        command = list(self.command) or [_decouple_script()]
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.nproc}",
                *command, "extract", *extract_argv(config), "--json"]
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        last = ""
        for line in process.stderr:  # the run's log, as it comes
            line = line.rstrip("\n")
            if line.strip():
                last = line
                log(line)
        output = process.stdout.read()
        if process.wait() != 0:
            raise DecoupleError(f"torchrun exited with code {process.returncode}: {last.strip()[:200]}")
        return ExtractResult(**json.loads(output.strip().splitlines()[-1]))


def _decouple_script() -> str:
    beside = Path(sys.executable).parent / "decouple"
    found = str(beside) if beside.is_file() else shutil.which("decouple")
    if found is None:
        raise DecoupleError("no `decouple` script beside this Python or on PATH for torchrun to launch")
    return found


def default_launcher(device: str = "auto") -> Launcher:
    """torchrun over every visible GPU when there are several and ``device``
    names none in particular (auto, cuda), else one process."""
    gpus = torch.cuda.device_count() if device in ("auto", "cuda") else 0
    return TorchrunLauncher(gpus) if gpus > 1 else run_in_process


class _Timeline:
    """Passes a run's log lines on and notes when each came: the embedding's
    time is from the line before the first ``embedded ...`` to the last."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.lines: List[Tuple[float, str]] = []

    def __call__(self, message: str) -> None:
        self.lines.append((time.perf_counter(), message))
        self.log(message)

    def embed_seconds(self) -> Optional[float]:
        embedded = [index for index, (_, message) in enumerate(self.lines) if message.startswith("embedded ")]
        if not embedded or embedded[0] == 0:
            return None
        return self.lines[embedded[-1]][0] - self.lines[embedded[0] - 1][0]


# --------------------------------------------------------------------------- recording


def run_record(
    stage_one: StageOneConfig,
    run: StageOneRun,
    *,
    result: Optional[ExtractResult] = None,
    embed_seconds: Optional[float] = None,
) -> RunRecord:
    """The stored form of a run whose feature file exists: settings and history
    from the file itself, timings from ``result`` when it was run now."""
    attrs = read_attrs(run.spec.path)
    extract = json.loads(attrs.get("config", "{}"))
    embedded = None
    if result is not None:
        embedded = sum(result.splits.values()) + int(extract.get("views", 0)) * result.splits.get("train", 0)
    return RunRecord(
        run_key=run.key,
        name=run.spec.name,
        features=run.spec.path,
        features_sha256=file_sha256(run.spec.path),
        backbone=run.backbone,
        loss=run.loss,
        sampler=run.sampler,
        profile=run.profile.tag,
        settings={"run": run.to_json(), "stage_one": stage_one.to_json(), "extract": extract},
        history=json.loads(attrs.get("history", "[]")),
        seconds=None if result is None else result.seconds,
        embed_images=embedded,
        embed_seconds=embed_seconds,
        world_size=extract.get("world_size"),
        versions=package_versions(),
        finished_at=utc_now(),
    )


def run_stage_one(
    config: SweepConfig,
    *,
    db: str,
    device: str = "auto",
    launcher: Optional[Launcher] = None,
    progress: bool = False,
    log: Log = print,
) -> StageOneSummary:
    """Make and record every missing run of ``config.stage_one``.

    The data are prepared and checked first, so bad input stops the sweep
    before any run. A run that raises is logged and listed in the summary,
    and the others go on; Ctrl-C stops at once (a rerun resumes the run in
    flight from its checkpoint).
    """
    started = time.perf_counter()
    plan = plan_stage_one(config, db=db)
    summary = StageOneSummary(total=len(plan.runs), already=len(plan.recorded))
    if not plan.pending and not plan.unrecorded:
        return summary
    stage_one = config.stage_one
    places = ConfigPlaces(config.source, dict(config.lines))
    data = prepare_data(config, places) if plan.pending else ""
    launch = launcher or default_launcher(device)
    with ResultStore(db) as store:
        for run in plan.unrecorded:
            summary.recorded += store.insert_run(run_record(stage_one, run))
        for index, run in enumerate(plan.pending, 1):
            log(f"stage one, run {index} of {len(plan.pending)}: {run.label}")
            timeline = _Timeline(log)
            try:
                result = launch(stage_one.extract_config(run, data, device=device, progress=progress), timeline)
            except Exception as exc:  # reported; the other runs go on
                reason = first_line(exc)
                if not isinstance(exc, DecoupleError):
                    reason = f"{type(exc).__name__}: {reason}"
                log(f"stage one: run {run.spec.name} failed: {reason}")
                summary.failed.append((run.spec.name, reason))
                continue
            summary.ran += 1
            summary.recorded += store.insert_run(
                run_record(stage_one, run, result=result, embed_seconds=timeline.embed_seconds())
            )
    summary.seconds = time.perf_counter() - started
    return summary
