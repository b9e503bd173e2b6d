"""The `stage_one:` section of a sweep: its config checks, its runs (named
from their settings, made through `decouple extract`, recorded, skipped on a
rerun, a failure reported while the rest go on), the archive data source,
the torchrun launch, and configs/study_tiny.yaml end to end."""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import sqlite3
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import cli
from decouple.errors import ConfigError, DataError
from decouple.features import read_features
from decouple.provenance import file_sha256
from decouple.stage_one import extract as extract_module
from decouple.stage_one.extract import ExtractConfig
from decouple.stage_one.finetune import FinetuneConfig
from decouple.stage_one.sources import unpack_archive
from decouple.stage_one.splits import SplitOptions
from decouple.study.config import load_config
from decouple.study.runner import run_sweep
from decouple.study.stage_one_runs import (
    TorchrunLauncher,
    extract_argv,
    plan_stage_one,
    run_in_process,
)
from decouple.study.store import ResultStore, RunRecord, load_records

ROOT = Path(__file__).resolve().parents[1]
TARBALL = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.xz"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_config(folder: Path, data, *, profiles: str = "[{imbalance: 10}]", heads: str = "[linear, ncm]",
                 extra: str = "", grid_extra: str = "") -> Path:
    """A small stage-one sweep on ``data``: test_resnet, ce and balanced_softmax, one epoch."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "study.yaml"
    path.write_text(f"""\
stage_one:
  data: {data}
  backbones: [test_resnet]
  losses: [ce, balanced_softmax]
  profiles: {profiles}
  n_max: 8
  val_per_class: 2
  test_per_class: 5
  finetune: {{epochs: 1, batch_size: 16}}
  features_dir: {folder / "features"}
{extra}grid:
  head: {heads}
  loss: [ce]
  seed: [0]
{grid_extra}train: {{epochs: 2}}
db: {folder / "results.db"}
""")
    return path


@pytest.fixture(scope="module")
def cifar_archive(cifar_subset, tmp_path_factory) -> Path:
    """The CIFAR-10 subset (train and test folders) as a .tar.gz, one folder at its top."""
    path = tmp_path_factory.mktemp("archive") / "cifar10-small.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        archive.add(cifar_subset, arcname="cifar10")
    return path


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


@pytest.fixture(scope="module")
def swept(cifar_archive, tmp_path_factory):
    """`decouple sweep` of a two-run study on the archive: (config path, first result)."""
    config = write_config(tmp_path_factory.mktemp("study"), cifar_archive)
    result = invoke("sweep", str(config), "--no-progress")
    assert result.exit_code == 0, result.output
    return config, result


# --------------------------------------------------------------------------- running and recording


def test_every_run_is_made_recorded_and_its_cells_run(swept):
    config_path, result = swept
    config = load_config(config_path)
    runs = config.stage_one.runs()
    assert [run.spec.name for run in runs] == ["test_resnet_ce_lt10", "test_resnet_balanced_softmax_lt10"]
    with ResultStore.open_existing(config.db) as store:
        records = {record.run_key: record for record in store.runs()}
    assert set(records) == {run.key for run in runs}
    for run in runs:
        record = records[run.key]
        path = Path(run.spec.path)
        assert path.name == f"{run.spec.name}-{run.key[:8]}.h5" and path.is_file()
        assert record.features_sha256 == file_sha256(path)
        assert record.loss == run.loss and record.sampler == "instance" and record.profile == "imbalance 10"
        assert len(record.history) == 1 and record.history[0]["images_per_second"] > 0
        extract = record.settings["extract"]
        assert extract["imbalance"] == 10 and extract["finetune"]["loss"] == run.loss
        features = read_features(path)
        assert record.embed_images == sum(len(split) for split in features.splits.values())
        assert record.embed_seconds > 0 and record.seconds > record.embed_seconds
        # test_per_class caps the data's own test split: 5 images of each of the 10 classes
        assert np.bincount(features.splits["test"].labels).tolist() == [5] * 10
        assert "test_lt" in features.splits
    cells = load_records(config.db)
    assert len(cells) == 4  # (linear / ce, ncm) on each file
    for cell in cells:
        run = next(run for run in runs if run.spec.path == cell.features)
        assert cell.backbone == "test_resnet" and cell.features_name == run.spec.name
        assert cell.tags == {"profile": "imbalance 10", "stage_one_loss": run.loss, "stage_one_sampler": "instance"}
    # the archive was unpacked once, beside the features
    assert [entry.name for entry in (Path(config.stage_one.features_dir) / "data").iterdir() if entry.is_dir()] \
        == [f"cifar10-small-{file_sha256(config.stage_one.data)[:12]}"]


def test_a_rerun_does_nothing_and_says_so_in_one_line(swept):
    config_path, _ = swept
    config = load_config(config_path)
    files = {run.spec.path: os.stat(run.spec.path).st_mtime_ns for run in config.stage_one.runs()}
    result = invoke("sweep", str(config_path), "--no-progress")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"nothing to do: all 2 stage-one runs and 4 cells are already in {config.db}"]
    assert result.stderr == ""
    assert {path: os.stat(path).st_mtime_ns for path in files} == files
    assert len(load_records(config.db)) == 4


def test_dry_run_lists_runs_and_cells_and_writes_nothing(cifar_archive, tmp_path, swept):
    config = write_config(tmp_path, cifar_archive)
    result = invoke("sweep", str(config), "--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("stage one: 2 runs: 0 already made, 2 to run")
    assert lines[1].strip().startswith("test_resnet_ce_lt10 (test_resnet / ce / instance / imbalance 10)")
    assert lines[3] == (f"4 cells: 0 already in {tmp_path / 'results.db'}, 4 to run "
                        f"(4 on feature files stage one will make)")
    assert "test_resnet_balanced_softmax_lt10 / ncm / seed 0" in lines[4:][-1]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["study.yaml"]
    done = invoke("sweep", str(swept[0]), "--dry-run").stdout.splitlines()
    assert done[0].startswith("stage one: 2 runs: 2 already made, 0 to run")
    assert done[1].startswith("4 cells: 4 already")


def test_a_failed_run_is_reported_and_the_rest_go_on(cifar_archive, tmp_path, monkeypatch):
    config_path = write_config(tmp_path, cifar_archive)

    def flaky(config: ExtractConfig, log):
        if config.finetune.loss == "ce":
            raise DataError("the disk went away")
        return run_in_process(config, log)

    monkeypatch.setattr("decouple.study.stage_one_runs.default_launcher", lambda device="auto": flaky)
    result = invoke("sweep", str(config_path), "--no-progress")
    assert result.exit_code == 1, result.output
    assert "stage one: run test_resnet_ce_lt10 failed: the disk went away" in result.stderr
    assert result.stdout.splitlines()[0].endswith("1 failed: test_resnet_ce_lt10 (the disk went away)")
    config = load_config(config_path)
    assert {cell.features_name for cell in load_records(config.db)} == {"test_resnet_balanced_softmax_lt10"}
    # the rerun makes only the failed run
    monkeypatch.undo()
    again = invoke("sweep", str(config_path), "--no-progress")
    assert again.exit_code == 0, again.output
    assert again.stdout.splitlines()[0].startswith("stage one: 2 runs: 1 run in ")
    assert again.stdout.splitlines()[0].endswith("1 already made")
    assert len(load_records(config.db)) == 4


def test_a_made_file_missing_from_the_database_is_recorded_without_a_run(swept, tmp_path):
    config = load_config(swept[0])
    other_db = str(tmp_path / "other.db")
    summary = run_sweep(config, db=other_db, launcher=lambda *args: pytest.fail("nothing should run"),
                        log=lambda line: None)
    assert (summary.stage_one.ran, summary.stage_one.recorded) == (0, 2)
    with ResultStore.open_existing(other_db) as store:
        assert all(record.seconds is None and len(record.history) == 1 for record in store.runs())


# --------------------------------------------------------------------------- the config


BAD = [
    ("  backbones: [test_resnet, resnet_fifty]\n", "line 3: stage_one.backbones[1]: unknown timm model 'resnet_fifty'"),
    ("  profiles: [balance, {imbalance: 10}]\n", "line 5: stage_one.profiles[0]: unknown profile 'balance' "
                                                 "(did you mean 'balanced'?)"),
    ("  profiles: [balanced]\n", "line 5: stage_one.profiles[0]: balanced needs exactly one long-tailed profile"),
    ("  profiles: [balanced, {imbalance: 10}, {imbalance: 100}]\n",
     "stage_one.profiles[0]: balanced needs exactly one long-tailed profile ({imbalance: IF}) as its reference"),
    ("  profiles: [{imbalance: 0.5}]\n", "line 5: stage_one.profiles[0].imbalance: must be a number >= 1; got 0.5"),
    ("  profiles: [{imbalanse: 10}]\n", "stage_one.profiles[0].imbalanse: unknown profile key 'imbalanse'"),
    ("  losses: [ce, focall]\n", "line 4: stage_one.losses[1]: unknown loss 'focall' (did you mean 'focal'?)"),
    ("  n_max: -3\n", "line 6: stage_one.n_max: --n-max must be >= 1; got -3"),
    ("  finetune: {epochs: ten, batch_size: 16}\n", "line 9: stage_one.finetune.epochs: must be int; got 'ten'"),
    ("  finetune: {epochs: 1, optimiser: sgd}\n", "stage_one.finetune.optimiser: unknown finetune setting 'optimiser' "
                                               "(did you mean 'optimizer'?)"),
    ("  finetune: {epochs: 1, img_size: [32]}\n", "stage_one.finetune.img_size: must be int or str; got [32]"),
]
# Values only `decouple extract` judged, once a run started: checked when the config is read.
BAD_FINETUNE = [
    ("  finetune: {epochs: 1, dtype: float64}\n",
     "line 9: stage_one.finetune.dtype: --dtype must be one of float16, float32; got 'float64'"),
    ("  finetune: {epochs: 1, views: -2}\n", "line 9: stage_one.finetune.views: --views must be >= 0; got -2"),
    ("  finetune: {epochs: 1, img_size: big}\n",
     "line 9: stage_one.finetune.img_size: --img-size must be auto, model or a number of pixels; got 'big'"),
    ("  finetune: {epochs: 1, lr_steps: [a]}\n", "line 9: stage_one.finetune.lr_steps: invalid literal for int()"),
]
BAD += BAD_FINETUNE


@pytest.mark.parametrize("line, message", BAD, ids=[message.split(": ")[1] for _, message in BAD])
def test_bad_stage_one_settings_name_the_line_and_key_path(tmp_path, line, message):
    path = write_config(tmp_path, "data")
    key = line.split(":")[0]
    text = "\n".join(line.rstrip("\n") if row.startswith(key + ":") else row
                     for row in path.read_text().splitlines()) + "\n"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(f"{path}, line ") and message in str(info.value), str(info.value)


@pytest.mark.parametrize("line, message", BAD_FINETUNE, ids=[message.split(": ")[1] for _, message in BAD_FINETUNE])
def test_a_dry_run_refuses_bad_finetune_values_with_exit_code_2(tmp_path, line, message):
    path = write_config(tmp_path, "data")
    path.write_text(path.read_text().replace("  finetune: {epochs: 1, batch_size: 16}\n", line))
    result = invoke("sweep", str(path), "--dry-run")
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["study.yaml"]


def test_a_sampler_that_synthesises_features_is_refused(tmp_path):
    path = write_config(tmp_path, "data", extra="")
    path.write_text(path.read_text().replace("  n_max: 8\n", "  samplers: [calibrated_features]\n  n_max: 8\n"))
    with pytest.raises(ConfigError, match=r"line 6: stage_one.samplers\[0\]: --sampler calibrated_features is a "
                                          r"stage-two sampler"):
        load_config(path)


def test_bad_data_is_refused_before_any_run_and_writes_nothing(cifar_subset, tmp_path):
    missing = write_config(tmp_path / "missing", tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"line 2: stage_one.data: .*nowhere: no such image folder"):
        run_sweep(missing, log=lambda line: None)
    # a loss setting with one number per class, given for 3 classes of a 10-class data set
    per_class = write_config(tmp_path / "alpha", cifar_subset, extra="params:\n  focal: {alpha: [1, 1, 1]}\n")
    per_class.write_text(per_class.read_text().replace("losses: [ce, balanced_softmax]", "losses: [ce, focal]"))
    with pytest.raises(ConfigError) as info:
        run_sweep(per_class, log=lambda line: None)
    assert f"line 12: params.focal.alpha: {cifar_subset} (10 classes): stage-one loss focal:" in str(info.value)
    assert "10 numbers; got 3" in str(info.value)
    for folder in ("missing", "alpha"):
        assert sorted(path.name for path in (tmp_path / folder).iterdir()) == ["study.yaml"]


def test_test_per_class_needs_a_test_split_of_the_data(tmp_path, cifar_subset):
    config = write_config(tmp_path, cifar_subset / "train")  # one folder per class, no test split
    with pytest.raises(DataError, match=r"stage_one.test_per_class: .*has no test split of its own"):
        run_sweep(config, log=lambda line: None)


def test_runs_are_named_and_keyed_by_their_settings(tmp_path):
    base = load_config(write_config(tmp_path / "a", "data", profiles="[balanced, {imbalance: 100}]"))
    runs = base.stage_one.runs()
    assert [(run.spec.name, run.spec.tags["profile"]) for run in runs] == [
        ("test_resnet_ce_balanced", "balanced"), ("test_resnet_ce_lt100", "imbalance 100"),
        ("test_resnet_balanced_softmax_balanced", "balanced"), ("test_resnet_balanced_softmax_lt100", "imbalance 100"),
    ]
    assert all(run.spec.backbone == "test_resnet" for run in runs)
    assert base.feature_specs()[: len(runs)] == tuple(run.spec for run in runs)
    balanced = base.stage_one.extract_config(runs[0], "unpacked")
    assert balanced.split == SplitOptions(imbalance=100, n_max=8, val_per_class=2, seed=0, train_profile="balanced")
    assert balanced.resume and balanced.out == runs[0].spec.path and balanced.data == "unpacked"
    assert balanced.finetune.loss == "ce" and balanced.finetune.epochs == 1
    # same settings, same key; another epoch count, another key and file
    same = load_config(write_config(tmp_path / "b", "data", profiles="[balanced, {imbalance: 100}]"))
    assert [run.key for run in same.stage_one.runs()] == [run.key for run in runs]
    changed = write_config(tmp_path / "c", "data", profiles="[balanced, {imbalance: 100}]")
    changed.write_text(changed.read_text().replace("epochs: 1,", "epochs: 2,"))
    assert {run.key for run in load_config(changed).stage_one.runs()}.isdisjoint({run.key for run in runs})


def test_stage_one_params_reach_the_fine_tuning_loss(tmp_path):
    path = write_config(tmp_path, "data", extra="params:\n  focal: {gamma: 1.5}\n")
    path.write_text(path.read_text().replace("losses: [ce, balanced_softmax]", "losses: [focal]"))
    run = load_config(path).stage_one.runs()[0]
    assert load_config(path).stage_one.extract_config(run, "d").finetune.loss_params == {"gamma": 1.5}


def test_the_extract_command_line_gives_back_the_same_config(monkeypatch):
    config = ExtractConfig(
        data="data/x", backbone="test_resnet", pretrained=False, img_size=48, views=1, dtype="float32",
        split=SplitOptions(imbalance=50, n_max=30, val_per_class=3, seed=4, train_profile="balanced"),
        finetune=FinetuneConfig(epochs=3, batch_size=8, lr=0.01, optimizer="adamw", lr_steps=(2, 3), amp=False,
                                loss="focal", loss_params={"gamma": 1.5, "alpha": [1, 2]}, sampler="square_root",
                                workers=0, seed=4, progress=False, cache_images="memory"),
        eval_batch_size=32, out="features/x.h5", resume=True, device="cpu", check_images=False,
    )
    seen = []

    def capture(parsed, log):
        seen.append(parsed)
        raise KeyboardInterrupt

    monkeypatch.setattr(extract_module, "run_extract", capture)
    invoke("extract", *extract_argv(config))
    assert seen == [dataclasses.replace(config, img_size="48")]  # --img-size takes text, as "auto" or "48"


# --------------------------------------------------------------------------- archives and the store


def test_an_archive_is_unpacked_once_and_atomically(tmp_path, monkeypatch):
    folder = tmp_path / "src" / "pics"
    for name in ("ant", "bee"):
        (folder / name).mkdir(parents=True)
        (folder / name / "0.txt").write_text(name)
    archive = tmp_path / "pics.tar.xz"
    with tarfile.open(archive, "w:xz") as handle:
        handle.add(folder, arcname="pics")
    root = unpack_archive(archive, tmp_path / "cache")
    assert root.name == "pics" and (root / "bee" / "0.txt").read_text() == "bee"
    monkeypatch.setattr(tarfile, "open", lambda *args, **kwargs: pytest.fail("unpacked twice"))
    assert unpack_archive(archive, tmp_path / "cache") == root
    monkeypatch.undo()
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(archive.read_bytes()[:200])
    with pytest.raises(DataError, match=r"broken.tar.gz: cannot be unpacked into"):
        unpack_archive(broken, tmp_path / "cache")
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == [root.parent.name]


def test_a_database_without_the_runs_table_stays_readable(tmp_path):
    path = tmp_path / "old.db"
    ResultStore(path).close()  # schema 2, as every database before stage-one runs
    with ResultStore.open_existing(path) as store:
        assert store.runs() == []
    record = RunRecord(run_key="k", name="n", features="f.h5", features_sha256="s", backbone="b", loss="ce",
                       sampler="instance", profile="balanced", settings={"a": 1},
                       history=[{"epoch": 1, "loss": float("nan")}], seconds=2.0)
    with ResultStore(path) as store:
        assert store.insert_run(record) and not store.insert_run(record)
    with ResultStore.open_existing(path) as store:
        (stored,) = store.runs()
    assert stored == dataclasses.replace(record, history=[{"epoch": 1, "loss": None}])
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("2",)


def test_a_run_made_again_replaces_its_record(tmp_path):
    path = tmp_path / "runs.db"
    first = RunRecord(run_key="k", name="n", features="f.h5", features_sha256="a" * 64, backbone="b", loss="ce",
                      sampler="instance", profile="balanced", settings={"a": 1},
                      history=[{"epoch": 1, "loss": 2.0}], seconds=5.0)
    other = RunRecord(run_key="other", name="o", features="o.h5", features_sha256="c" * 64, backbone="b",
                      loss="focal", sampler="instance", profile="balanced", settings={}, history=[])
    # the feature file deleted and made again: another sha256, history and timing
    again = dataclasses.replace(first, features_sha256="b" * 64, history=[{"epoch": 1, "loss": 1.5}], seconds=7.0)
    with ResultStore(path) as store:
        assert store.insert_run(first) and store.insert_run(other)
        assert not store.insert_run(dataclasses.replace(first, seconds=99.0))  # same file: kept as recorded
        assert store.runs() == [first, other]
        assert store.insert_run(again)
    with ResultStore.open_existing(path) as store:
        assert sorted(store.runs(), key=lambda record: record.run_key) == [again, other]


# --------------------------------------------------------------------------- several processes, the tiny study


@pytest.mark.slow
def test_torchrun_launches_each_run_on_several_processes(cifar_subset, tmp_path):
    config = load_config(write_config(tmp_path, cifar_subset, heads="[ncm]"))
    config = dataclasses.replace(config, stage_one=dataclasses.replace(config.stage_one, losses=("ce",)))
    lines = []
    summary = run_sweep(config, launcher=TorchrunLauncher(2), train_overrides={"device": "cpu"}, log=lines.append)
    assert summary.stage_one.ran == 1 and not summary.stage_one.failed, lines[-5:]
    with ResultStore.open_existing(config.db) as store:
        (record,) = store.runs()
    assert record.world_size == 2 and len(record.history) == 1 and record.embed_seconds > 0
    assert any(line.startswith("embedded test_lt") for line in lines)


@pytest.mark.slow
def test_the_tiny_study_runs_end_to_end(tmp_path):
    """configs/study_tiny.yaml as shipped, its paths moved to tmp_path; needs the
    balanced profile (R), the finetuned head (H) and export --layout study (T)."""
    if not TARBALL.exists():
        pytest.skip(f"{TARBALL} not present")
    text = (ROOT / "configs" / "study_tiny.yaml").read_text()
    text = text.replace("../shared/data/cifar10-jpg.tar.xz", str(TARBALL))
    text = text.replace("features/study_tiny", str(tmp_path / "features"))
    text = text.replace("results/study_tiny.db", str(tmp_path / "study.db"))
    config_path = tmp_path / "study_tiny.yaml"
    config_path.write_text(text)
    result = invoke("sweep", str(config_path), "--no-progress")
    assert result.exit_code == 0, result.output
    again = invoke("sweep", str(config_path), "--no-progress")
    assert again.stdout.splitlines() == [
        f"nothing to do: all 8 stage-one runs and 32 cells are already in {tmp_path / 'study.db'}"]
    tables = invoke("export", "--db", str(tmp_path / "study.db"), "--layout", "study")
    assert tables.exit_code == 0, tables.output
    for backbone in ("test_resnet", "test_efficientnet"):
        for profile in ("balanced", "imbalance 100"):
            assert f"### {backbone}, trained on {profile}" in tables.stdout
    rows = list(csv.DictReader(io.StringIO(
        invoke("export", "--db", str(tmp_path / "study.db"), "--layout", "study", "--format", "csv").stdout)))
    assert {(row["backbone"], row["profile"]) for row in rows} == {
        (backbone, profile) for backbone in ("test_resnet", "test_efficientnet")
        for profile in ("balanced", "imbalance 100")}
    assert {"ce (end to end)", "balanced_softmax (end to end)"} <= {row["method"] for row in rows}
    for row in rows:
        if row["profile"] == "balanced":
            for split in ("test_lt", "many", "medium", "few"):
                assert row[f"{split}_top1_mean"] != "", (row["method"], split)
