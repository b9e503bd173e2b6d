"""Sweep configs (validation with places in the file), cell expansion, and
the resumable runner: rerun skips finished cells, an interrupted sweep
resumed ends with the same database as an uninterrupted one."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from decouple.errors import ConfigError, FeatureFileError
from decouple.features import write_features
from decouple.study.config import load_config, parse_config
from decouple.study.plan import plan_sweep
from decouple.study.runner import SweepInterrupted, run_sweep
from decouple.study.store import ResultStore
from decouple.synthetic import gaussian_long_tailed

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def features_path(tmp_path_factory) -> str:
    """A small long-tailed Gaussian feature file: 12 classes, 200 -> 2 training rows."""
    feature_set, _ = gaussian_long_tailed(num_classes=12, dim=8, n_max=200, imbalance_factor=100,
                                          n_val=8, n_test=15, seed=3)
    path = tmp_path_factory.mktemp("features") / "toy_lt.h5"
    write_features(path, feature_set)
    return str(path)


def write_config(tmp_path: Path, text: str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def small_config(features_path: str, db: Path, **extra: str) -> str:
    return f"""
        features: [{features_path}]
        grid:
          head: [linear, ncm]
          loss: [ce, balanced_softmax, focal, equalization]
          sampler: [instance, class_balanced]
          seed: [0, 1]
        params:
          focal: {{gamma: {extra.get('gamma', '2.0')}}}
        train: {{epochs: 2, batch_size: 256}}
        db: {db}
    """


def comparable(store_path: Path) -> dict:
    """cell_key -> everything that must not depend on timing or interruption."""
    with ResultStore.open_existing(store_path) as store:
        out = {}
        for record in store.records():
            data = record.to_json()
            for volatile in ("fit_seconds", "wall_seconds", "finished_at", "versions"):
                data.pop(volatile)
            out[record.cell_key] = data
        return out


# ---------------------------------------------------------------------------
# Config validation.
# ---------------------------------------------------------------------------


BAD_CONFIGS = [
    (  # unknown name, with its place, a suggestion and the known names
        """
        features: [f.h5]
        grid:
          head: [linear]
          loss: [ce, focal, focall]
        """,
        r"sweep\.yaml, line 4: grid\.loss\[2\]: unknown loss 'focall' \(did you mean 'focal'\?\); "
        r"known losses: ce, .*logit_adjusted",
    ),
    (
        """
        features: [f.h5]
        grid: {head: [linaer], loss: [ce]}
        """,
        r"line 2: grid\.head\[0\]: unknown head 'linaer' \(did you mean 'linear'\?\); known heads: linear",
    ),
    (
        """
        features: [f.h5]
        grid: {head: [linear], loss: [ce], sampler: [square]}
        """,
        r"grid\.sampler\[0\]: unknown sampler 'square' \(did you mean 'square_root'\?\)",
    ),
    (
        """
        features: [f.h5]
        grid: {head: [linear], loss: [ce]}
        trian: {epochs: 3}
        """,
        r"line 3: trian: unknown key 'trian' \(did you mean 'train'\?\); known keys: features, grid",
    ),
    (
        """
        features: [f.h5]
        grid: {head: [linear], loss: [ce], seeds: [0]}
        """,
        r"grid\.seeds: unknown key 'seeds' \(did you mean 'seed'\?\)",
    ),
    (
        """
        features: [f.h5]
        grid: {head: [linear], loss: [focal]}
        params:
          focal: {gama: 2.0}
        """,
        r"line 4: params\.focal\.gama: focal takes no setting 'gama' \(did you mean 'gamma'\?\); it takes: gamma, alpha",
    ),
    (
        """
        features: [f.h5]
        grid: {head: [linear], loss: [focal]}
        params:
          focl: {gamma: 2.0}
        """,
        r"params\.focl: unknown method 'focl' \(did you mean 'focal'\?\)",
    ),
    (
        """
        features: [f.h5]
        grid: {head: [linear], loss: [focal]}
        params:
          focal: {gamma: -1}
        """,
        r"line 4: params\.focal\.gamma: cell linear/focal/instance: .*gamma must be >= 0",
    ),
    (
        """
        features: [f.h5]
        grid: {head: [linear], loss: [ce]}
        train: {epochs: 0}
        """,
        r"line 3: train\.epochs: .*epochs must be an integer >= 1",
    ),
    (
        """
        features: [f.h5]
        grid: {head: [linear], loss: [ce]}
        train: {epoch: 3}
        """,
        r"train\.epoch: unknown train setting 'epoch' \(did you mean 'epochs'\?\); known train settings: epochs, min_steps",
    ),
    (
        """
        features: [f.h5]
        grid: {head: [linear], loss: [ce]}
        train: {lr: fast}
        """,
        r"train\.lr: must be float or null; got 'fast'",
    ),
    (
        """
        features: [f.h5]
        grid: {head: [linear]}
        """,
        r"grid: missing key 'loss'",
    ),
    (
        """
        features: [f.h5]
        grid: {head: [ncm], seed: [0, -1]}
        """,
        r"grid\.seed\[1\]: must be a non-negative integer; got -1",
    ),
    (
        """
        features:
          - {path: a.h5, name: x}
          - {path: b.h5, name: x}
        grid: {head: [ncm]}
        """,
        r"line 3: features\[1\]\.name: name 'x' is already used by 'a.h5'",
    ),
    (
        """
        features:
          - {path: a.h5, label: x}
        grid: {head: [ncm]}
        """,
        r"features\[0\]\.label: unknown key 'label'; known keys: path, name, backbone, tags",
    ),
    (
        """
        features: [f.h5]
        grid: {head: [ncm]}
        grid: {head: [linear]}
        """,
        r"line 3: grid: key given twice",
    ),
    (
        """
        features: [f.h5]
        grid:
          head: [linear
          loss: [ce]
        """,
        r"sweep\.yaml, line \d+, column \d+: invalid YAML",
    ),
    ("", r"sweep\.yaml: \(top level\): must be a mapping .*; got an empty file"),
]


@pytest.mark.parametrize("text, message", BAD_CONFIGS)
def test_bad_configs_name_file_line_and_key(tmp_path, text, message):
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert "\n" not in str(info.value)
    assert str(path) in str(info.value)


def test_bad_config_on_the_command_line_exits_2(tmp_path):
    from cli.main import cli

    path = write_config(tmp_path, "features: [f.h5]\ngrid: {head: [linear], loss: [focall]}\n")
    result = CliRunner().invoke(cli, ["sweep", str(path)])
    assert result.exit_code == 2
    assert "grid.loss[0]: unknown loss 'focall' (did you mean 'focal'?)" in result.output
    assert not (tmp_path / "results.db").exists()


def test_missing_feature_file_stops_before_the_first_cell(tmp_path, features_path):
    db = tmp_path / "r.db"
    path = write_config(tmp_path, f"""
        features: [{features_path}, {tmp_path / 'missing.h5'}]
        grid: {{head: [ncm]}}
        db: {db}
    """)
    with pytest.raises(FeatureFileError, match=r"line 1: features\[1\]: .*missing\.h5: no such feature file"):
        run_sweep(path)
    assert not db.exists()


def test_expansion_runs_training_free_heads_once_per_file_and_seed(tmp_path, features_path):
    config = parse_config({
        "features": [features_path, {"path": features_path + ".copy", "name": "copy", "tags": {"data": "lt"}}],
        "grid": {"head": ["linear", "tau_norm", "ncm", "knn"], "loss": ["ce", "ldam"],
                 "sampler": ["instance", "square_root", "progressive"], "seed": [0, 1, 2]},
        "params": {"ldam": {"drw_epoch": 1}, "tau_norm": {"taus": [0.0, 1.0]}, "knn": {"k": 3}},
    })
    cells = config.cells()
    trained = 2 * 3 * 2 * 2 * 3  # features x seeds x heads x losses x samplers
    free = 2 * 3 * 2  # features x seeds x (ncm, knn)
    assert len(cells) == trained + free
    knn = [cell for spec, cell in cells if cell.head == "knn"]
    assert all(cell.loss is None and cell.sampler is None for cell in knn)
    assert knn[0].params == {"knn": {"k": 3}}
    ldam = next(cell for spec, cell in cells if cell.loss == "ldam")
    assert ldam.params == {"ldam": {"drw_epoch": 1}}
    assert config.features[0].name == "toy_lt" and config.features[1].tags == {"data": "lt"}


def test_a_name_that_is_loss_and_sampler_gets_only_its_role_settings():
    config = parse_config({
        "features": ["f.h5"],
        "grid": {"head": ["linear"], "loss": ["ce", "class_balanced"], "sampler": ["class_balanced"]},
        "params": {"class_balanced": {"beta": 0.99}},
    })
    params = {cell.loss: dict(cell.params) for _, cell in config.cells()}
    assert params == {"ce": {}, "class_balanced": {"class_balanced": {"beta": 0.99}}}


# study_grid: 4 backbones x 7 losses x 2 profiles stage-one files, each with
# finetuned, linear x (ce, balanced_softmax) and ncm, for 3 seeds.
@pytest.mark.parametrize("name, cells", [("cifar10_lt.yaml", 6 * 9 * 5 * 3 + 2 * 3),
                                         ("study_grid.yaml", 4 * 7 * 2 * 3 * (1 + 2 + 1))])
def test_shipped_configs_are_valid(name, cells):
    config = load_config(ROOT / "configs" / name)
    assert len(config.cells()) == cells
    if name == "study_grid.yaml":
        assert {spec.backbone for spec in config.feature_specs()} == {
            "mobilenetv2_100", "resnetv2_50", "convnext_base", "vit_base_patch16_224"}
        assert {spec.tags["profile"] for spec in config.feature_specs()} == {"balanced", "imbalance 100"}
        assert {spec.tags["stage_one_loss"] for spec in config.feature_specs()} == {
            "ce", "focal", "weighted_ce", "class_balanced", "balanced_softmax", "equalization", "ldam"}
        assert config.stage_one.finetune["pretrained"] is True


# ---------------------------------------------------------------------------
# Running and resuming.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, features_path):
    """An uninterrupted sweep: (config path, db path)."""
    root = tmp_path_factory.mktemp("full")
    db = root / "full.db"
    path = write_config(root, small_config(features_path, db))
    summary = run_sweep(path)
    assert summary.total == summary.ran == 2 * (8 + 1)
    return path, db


def test_rerun_skips_finished_cells(full_run):
    path, db = full_run
    before = comparable(db)
    summary = run_sweep(path)
    assert (summary.ran, summary.skipped) == (0, summary.total)
    assert comparable(db) == before


def test_interrupted_sweep_resumes_to_the_same_database(tmp_path, features_path, full_run):
    _, full_db = full_run
    db = tmp_path / "resumed.db"
    path = write_config(tmp_path, small_config(features_path, db))
    seen = []

    def interrupt_after_five(record):
        seen.append(record.cell_key)
        if len(seen) == 5:
            raise KeyboardInterrupt

    with pytest.raises(SweepInterrupted, match=r"5 of 18 cells are stored in .*rerun") as info:
        run_sweep(path, on_result=interrupt_after_five)
    assert info.value.done == 5
    with ResultStore.open_existing(db) as store:
        assert store.finished_keys() == set(seen)

    rerun_keys = []
    summary = run_sweep(path, on_result=lambda record: rerun_keys.append(record.cell_key))
    assert summary.ran == 13 and summary.skipped == 5
    assert not set(rerun_keys) & set(seen)
    assert comparable(db) == comparable(full_db)


def test_a_changed_setting_never_reuses_an_old_result(tmp_path, features_path, full_run):
    _, full_db = full_run
    db = tmp_path / "changed.db"
    db.write_bytes(full_db.read_bytes())
    path = write_config(tmp_path, small_config(features_path, db, gamma="1.0"))
    plan = plan_sweep(load_config(path))
    # Only the focal cells (2 samplers x 2 seeds) see gamma.
    assert sorted({p.cell.loss for p in plan.pending}) == ["focal"] and len(plan.pending) == 4
    overrides = plan_sweep(load_config(path), train_overrides={"epochs": 3})
    assert len(overrides.pending) == 16  # every trained cell; ncm does not train
    device_only = plan_sweep(load_config(path), train_overrides={"device": "cpu"})
    assert len(device_only.pending) == 4


def test_stored_cells_carry_provenance(full_run, features_path):
    _, db = full_run
    with ResultStore.open_existing(db) as store:
        records = store.records()
    ncm = [r for r in records if r.head == "ncm"]
    assert len(ncm) == 2 and all(r.loss is None and r.sampler is None for r in ncm)
    record = next(r for r in records if r.loss == "focal")
    assert record.features == features_path and record.features_name == "toy_lt"
    assert len(record.features_sha256) == 64 and len(record.config_hash) == 64
    assert record.train["epochs"] == 2 and "torch" in record.versions
    assert record.train_counts[0] == 200 and len(record.class_names) == 12
    assert set(record.metrics) == {"val", "test"}
    assert len(record.metrics["test"]["per_class"]) == 12
    assert record.params["loss"]["gamma"] == 2.0


def test_sweep_command_interrupted_exits_130_and_says_rerun(tmp_path, features_path, monkeypatch):
    from cli.main import cli
    import decouple.study.runner as runner

    db = tmp_path / "cli.db"
    path = write_config(tmp_path, small_config(features_path, db))
    result = CliRunner().invoke(cli, ["sweep", str(path), "--dry-run"])
    assert result.exit_code == 0 and "18 cells: 0 already in" in result.output

    real_fit_cells = runner.fit_cells

    def fit_then_interrupt(feature_set, cells, *, on_result, **kwargs):
        stored = []

        def store_then_interrupt(result):
            on_result(result)
            stored.append(result)
            if len(stored) == 3:
                raise KeyboardInterrupt

        return real_fit_cells(feature_set, cells, on_result=store_then_interrupt, **kwargs)

    monkeypatch.setattr(runner, "fit_cells", fit_then_interrupt)
    result = CliRunner().invoke(cli, ["sweep", str(path), "--no-progress"])
    assert result.exit_code == 130
    assert "interrupted: 3 of 18 cells are stored in" in result.output
    assert "rerun the same command" in result.output


@pytest.mark.slow
def test_sigint_to_a_running_sweep_keeps_finished_cells(tmp_path, features_path):
    """A real Ctrl-C: the process exits 130, the database holds whole cells only."""
    # 200 cells of about 0.4 s: the sweep is far from its end when the signal
    # comes, however slow the machine is at noticing the first two cells.
    db = tmp_path / "sigint.db"
    path = write_config(tmp_path, f"""
        features: [{features_path}]
        grid: {{head: [linear], loss: [ce], seed: [{', '.join(str(s) for s in range(200))}]}}
        train: {{epochs: 40, batch_size: 64}}
        db: {db}
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Python keeps an inherited "ignore SIGINT" (as under `nohup cmd &`), so
    # the child installs Python's own handler, as it has on a terminal.
    terminal_like = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    process = subprocess.Popen(
        [sys.executable, "-c", terminal_like + "from cli.main import cli; cli()", "sweep", str(path), "--no-progress"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        done = 0
        while time.monotonic() < deadline and process.poll() is None:
            if db.exists():
                try:
                    done = sqlite3.connect(f"file:{db}?mode=ro", uri=True).execute(
                        "SELECT COUNT(*) FROM cells").fetchone()[0]
                except sqlite3.OperationalError:
                    done = 0
                if done >= 2:
                    break
            time.sleep(0.05)
        assert process.poll() is None, "the sweep finished before it could be interrupted"
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, f"{done} cells stored when signalled; stdout {stdout!r}; stderr {stderr!r}"
    assert "rerun the same command" in stderr
    connection = sqlite3.connect(db)
    assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    cells = connection.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
    metric_rows = connection.execute("SELECT COUNT(*) FROM metrics").fetchone()[0]
    assert cells >= 2 and metric_rows == 2 * cells  # val and test of every stored cell
    assert 2 <= cells < 200 and f"{cells} of 200 cells" in stderr


def test_per_class_settings_are_checked_against_each_files_real_class_count(tmp_path):
    # A 43-class file: a 43-long focal alpha validates; a 42-long one fails
    # before any cell runs, naming the file and the key path.
    feature_set, _ = gaussian_long_tailed(num_classes=43, dim=4, n_max=40, imbalance_factor=10, n_val=2,
                                          n_test=2, seed=0)
    features = tmp_path / "f43.h5"
    write_features(features, feature_set)
    db = tmp_path / "r.db"

    def config(alpha_length):
        alpha = ", ".join(["1.0"] * alpha_length)
        return write_config(tmp_path, f"""
            features: [{features}]
            grid: {{head: [linear], loss: [focal]}}
            params:
              focal: {{alpha: [{alpha}]}}
            train: {{epochs: 1}}
            db: {db}
        """)

    plan = plan_sweep(load_config(config(43)))
    assert len(plan.pending) == 1
    bad = config(42)
    load_config(bad)  # the file's class count is not known from the config alone
    with pytest.raises(ConfigError) as info:
        run_sweep(bad)
    message = str(info.value)
    assert "\n" not in message
    assert f"line 4: params.focal.alpha: {features} (43 classes): cell linear/focal/instance: " in message
    assert "43 numbers; got 42" in message
    assert not db.exists()


@pytest.mark.parametrize("name", ["cifar10_lt.yaml", "study_grid.yaml"])
def test_the_shipped_configs_commands_use_real_options_and_name_their_files(name):
    import re

    from cli.main import cli

    text = (ROOT / "configs" / name).read_text()
    config = load_config(ROOT / "configs" / name)
    commands = re.sub(r"\\\n#\s*", " ", text)  # join continued comment lines
    for command, rest in re.findall(r"decouple (extract|sweep|export) ([^\n]*)", commands):
        known = {option for param in cli.get_command(None, command).params for option in param.opts}
        for option in re.findall(r"(--[a-z][a-z-]*)", rest):
            assert option in known, f"{name}: `decouple {command}` has no option {option}"
    backbones = re.findall(r"for B in ([^;]+);", commands)
    made = set()
    for run in re.findall(r"decouple extract [^\n]*--name (\S+)", commands):
        for backbone in (backbones[0].split() if "${B}" in run else [None]):
            made.add(f"features/{run.replace('${B}', backbone or '')}.h5")  # --features-dir features
    assert {spec.path for spec in config.features} <= made
    names = {spec.name for spec in config.features} | {spec.path for spec in config.features}
    for chosen in re.findall(r"--features (\S+)", commands):
        assert chosen in names, f"{name}: --features {chosen} names no feature file of the config"


def test_head_takes_loss_follows_each_head_class():
    from decouple.stage_two.heads import HEADS, Head
    from decouple.study.grid import head_takes_loss

    assert [name for name in HEADS.names() if head_takes_loss(name)] == [
        "linear", "cosine", "tau_norm", "posthoc_la", "lws", "disalign"]
    assert [name for name in HEADS.names() if not head_takes_loss(name)] == ["ncm", "knn", "finetuned"]
    assert Head.trainable is False  # a new head takes no loss unless its class says so


def test_every_stored_cell_keeps_the_per_image_predictions_its_metrics_came_from(full_run):
    """What export --ci and recommend resample: each scored split's labels and
    top-5, consistent with the stored top-1 and top-5."""
    import numpy as np

    from decouple.features import read_features

    path, db = full_run
    with ResultStore.open_existing(db) as store:
        records = store.records(predictions=True)
    feature_set = read_features(records[0].features)
    for record in records:
        assert set(record.predictions) == set(record.metrics) == {"val", "test"}
        for split, predicted in record.predictions.items():
            assert np.array_equal(predicted.labels, feature_set.splits[split].labels)
            assert np.mean(predicted.predicted == predicted.labels) == record.metrics[split]["top1"]
            hits = (predicted.top == predicted.labels[:, None]).any(axis=1)
            assert np.mean(hits) == record.metrics[split]["top5"]
