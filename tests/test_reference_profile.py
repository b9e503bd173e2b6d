"""The reference profile (issue 14, item 2): a balanced run and its long-tailed
sibling share val, test and test_lt, and both take their many / medium / few
groups from the long-tailed profile's training counts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli.main import cli
from decouple.errors import ConfigError, FeatureFileError
from decouple.features import FeatureSet, Split, read_features, read_reference_counts, write_features
from decouple.metrics import shot_groups
from decouple.profiles import exponential_counts
from decouple.stage_one.splits import TRAIN_PROFILES, SplitOptions, prepare_manifest
from decouple.study.store import ResultStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLASSES = ("ant", "bee", "fly", "moth")
PER_CLASS = 18  # test 4, val 2, 12 left: enough for n_max = 10 in every class
PROFILE = dict(imbalance=10, n_max=10, val_per_class=2, seed=3)
REFERENCE = exponential_counts(10, 4, 10)  # [10, 4, 2, 1]
# thresholds that put the reference profile in all three groups: many {ant}, medium {bee, fly}, few {moth}
THRESHOLDS = ("--many-threshold", "5", "--few-threshold", "2")
TRACK = r"^(\d+)_"


def image_folder(root: Path, per_class: dict) -> Path:
    """ROOT/<class>/<track>_<j>.png, two images per track, 32 x 32 random pixels."""
    rng = np.random.default_rng(0)
    for name, count in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for j in range(count):
            pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{j // 2:03d}_{j % 2}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return image_folder(tmp_path_factory.mktemp("ref") / "insects", {name: PER_CLASS for name in CLASSES})


def siblings(data: Path, **options):
    """(long-tailed manifest, balanced manifest) of the same profile and seed."""
    return tuple(
        prepare_manifest(data, SplitOptions(**PROFILE, **options, train_profile=profile), check_images=False)
        for profile in ("long_tailed", "balanced")
    )


def refs(manifest, split: str) -> list:
    return list(manifest.splits[split].refs)


@pytest.mark.parametrize("group_by", [None, TRACK])
def test_the_balanced_sibling_shares_every_held_out_split(folder, group_by):
    long_tailed, balanced = siblings(folder, group_by=group_by)
    for split in ("val", "test", "test_lt"):
        assert refs(balanced, split) == refs(long_tailed, split), split
    np.testing.assert_array_equal(long_tailed.counts("train"), REFERENCE)
    np.testing.assert_array_equal(balanced.counts("train"), [10, 10, 10, 10])
    assert set(refs(long_tailed, "train")) < set(refs(balanced, "train"))
    assert not set(refs(balanced, "train")) & set(refs(balanced, "val") + refs(balanced, "test"))
    for manifest in (long_tailed, balanced):
        np.testing.assert_array_equal(manifest.reference_counts, REFERENCE)
        assert manifest.reference_source == (
            "exponential long-tailed profile (Cao et al. 2019): imbalance 10, n_max 10, seed 3"
        )
    assert (long_tailed.train_profile, balanced.train_profile) == ("long_tailed", "balanced")


def test_a_class_short_of_n_max_keeps_every_image_it_has_left(tmp_path):
    data = image_folder(tmp_path / "d", {"ant": PER_CLASS, "bee": PER_CLASS, "fly": PER_CLASS, "moth": 8})
    long_tailed, balanced = siblings(data)
    # moth: 8 images, test 2, val 2: 4 left to train on
    np.testing.assert_array_equal(balanced.counts("train"), [10, 10, 10, 4])
    assert balanced.info["profile"]["short_classes"] == ["moth"]
    assert set(refs(long_tailed, "train")) < set(refs(balanced, "train"))
    assert refs(balanced, "test_lt") == refs(long_tailed, "test_lt")


def test_balanced_without_imbalance_is_refused():
    with pytest.raises(ConfigError, match="--train-profile balanced needs --imbalance"):
        SplitOptions(train_profile="balanced")
    with pytest.raises(ConfigError, match="--train-profile must be one of long_tailed, balanced; got 'flat'"):
        SplitOptions(imbalance=10, train_profile="flat")
    extract = cli.get_command(None, "extract")
    choices = next(param for param in extract.params if param.name == "train_profile").type.choices
    assert tuple(choices) == TRAIN_PROFILES


def test_the_cli_refuses_balanced_without_imbalance_in_one_line(folder, tmp_path):
    result = CliRunner().invoke(cli, ["extract", "--data", str(folder), "--train-profile", "balanced",
                                      "--features-dir", str(tmp_path), "--epochs", "0", "--no-progress"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--train-profile balanced needs --imbalance IF" in lines[0], result.stderr
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def extracted(folder, tmp_path_factory):
    """{profile: feature file} of `decouple extract --epochs 0` on both siblings."""
    out = tmp_path_factory.mktemp("features")
    paths = {}
    for profile in ("long_tailed", "balanced"):
        result = CliRunner().invoke(cli, [
            "extract", "--data", str(folder), "--backbone", "test_resnet", "--epochs", "0", "--imbalance", "10",
            "--n-max", "10", "--val-per-class", "2", "--seed", "3", "--train-profile", profile,
            "--batch-size", "16", "--features-dir", str(out), "--no-progress", "--no-check", "--json",
        ])
        assert result.exit_code == 0, result.output
        paths[profile] = Path(json.loads(result.stdout.strip().splitlines()[-1])["path"])
    return paths


def test_both_files_hold_the_long_tailed_training_counts(extracted):
    assert extracted["balanced"].name == "insects_test_resnet_balanced_lt10.h5"
    assert extracted["long_tailed"].name == "insects_test_resnet_lt10.h5"
    long_tailed, balanced = (read_features(extracted[p]) for p in ("long_tailed", "balanced"))
    np.testing.assert_array_equal(long_tailed.train_counts, REFERENCE)
    np.testing.assert_array_equal(balanced.train_counts, [10, 10, 10, 10])
    for feature_set, profile in ((long_tailed, "long_tailed"), (balanced, "balanced")):
        assert feature_set.reference_counts.dtype == np.int64
        np.testing.assert_array_equal(feature_set.reference_counts, long_tailed.train_counts)
        np.testing.assert_array_equal(read_reference_counts(feature_set.path), long_tailed.train_counts)
        assert "imbalance 10, n_max 10, seed 3" in feature_set.reference_source
        assert feature_set.attrs["train_profile"] == profile
        assert json.loads(feature_set.attrs["manifest"])["train_profile"] == profile
    for split in ("val", "test", "test_lt"):  # the same images, by their perceptual hashes
        np.testing.assert_array_equal(balanced.splits[split].fingerprints, long_tailed.splits[split].fingerprints)
        np.testing.assert_array_equal(balanced.splits[split].labels, long_tailed.splits[split].labels)


def head_json(path: Path) -> dict:
    result = CliRunner().invoke(cli, ["head", "--features", str(path), "--head", "ncm", *THRESHOLDS, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_head_groups_the_balanced_file_like_its_long_tailed_sibling(extracted):
    expected = shot_groups(REFERENCE, many_threshold=5, few_threshold=2)
    assert [len(expected[g]) for g in ("many", "medium", "few")] == [1, 2, 1]
    own = shot_groups(read_features(extracted["balanced"]).train_counts, many_threshold=5, few_threshold=2)
    assert len(own["many"]) == 4  # by its own counts every class would be many-shot
    for profile in ("long_tailed", "balanced"):
        result = head_json(extracted[profile])
        recorded = result["params"]["shot_groups"]
        assert recorded["counts"] == "reference" and recorded["reference_counts"] == REFERENCE.tolist()
        for split in ("test", "test_lt"):
            metrics = result["metrics"][split]
            per_class = np.array([np.nan if v is None else v for v in metrics["per_class"]])
            for group, classes in expected.items():
                assert metrics[group] == pytest.approx(float(np.nanmean(per_class[classes]))), (profile, split, group)


def test_a_sweep_stores_and_regroups_by_the_reference_counts(extracted, tmp_path):
    config = tmp_path / "sweep.yaml"
    config.write_text(
        f"features: [{extracted['balanced']}]\n"
        "grid: {head: [ncm], seed: [0]}\n"
        "train: {many_threshold: 5, few_threshold: 2}\n"
        f"db: {tmp_path / 'results.db'}\n"
    )
    result = CliRunner().invoke(cli, ["sweep", str(config), "--no-progress"])
    assert result.exit_code == 0, result.output
    with ResultStore.open_existing(tmp_path / "results.db") as store:
        (record,) = store.records()
    assert record.train_counts == [10, 10, 10, 10] and record.group_counts == REFERENCE.tolist()
    groups = record.shot_groups()
    assert [groups[g].tolist() for g in ("many", "medium", "few")] == [[0], [1, 2], [3]]
    assert record.metrics["test"]["few"] is not None


def test_info_prints_the_reference_counts_and_their_groups(extracted):
    result = CliRunner().invoke(cli, ["info", str(extracted["balanced"]), "--no-health", *THRESHOLDS])
    assert result.exit_code == 0, result.output
    assert "train profile balanced" in result.output
    assert ("reference counts: max 10, min 1 (exponential long-tailed profile (Cao et al. 2019): imbalance 10, "
            "n_max 10, seed 3); the shot groups come from them") in result.output
    assert "shot groups: many 1 (> 5), medium 2 (2..5), few 1 (< 2)" in result.output
    summary = json.loads(CliRunner().invoke(cli, ["info", str(extracted["balanced"]), "--no-health", "--json"]).output)
    assert summary["group_counts"] == "reference" and summary["reference_counts"]["counts"] == REFERENCE.tolist()


# --------------------------------------------------------------------------- the file contract


def small_set(reference=None) -> FeatureSet:
    rng = np.random.default_rng(0)
    split = Split(rng.normal(size=(6, 3)).astype(np.float32), np.array([0, 0, 0, 1, 1, 2]))
    return FeatureSet(["a", "b", "c"], {"train": split, "test": split}, reference_counts=reference,
                      reference_source=None if reference is None else "a profile")


def test_reference_counts_round_trip_and_are_optional(tmp_path):
    write_features(tmp_path / "with.h5", small_set(np.array([5, 2, 1])))
    read = read_features(tmp_path / "with.h5")
    np.testing.assert_array_equal(read.reference_counts, [5, 2, 1])
    np.testing.assert_array_equal(read.group_counts, [5, 2, 1])
    assert read.reference_source == "a profile"
    write_features(tmp_path / "without.h5", small_set())
    assert read_reference_counts(tmp_path / "without.h5") is None
    np.testing.assert_array_equal(read_features(tmp_path / "without.h5").group_counts, [3, 2, 1])


def test_a_wrong_shaped_reference_is_refused_in_one_line(tmp_path):
    import h5py

    path = write_features(tmp_path / "bad.h5", small_set())
    with h5py.File(path, "a") as handle:
        handle["train"].create_dataset("reference_counts", data=np.array([5, 2]))
    with pytest.raises(FeatureFileError, match=r"bad.h5: /train/reference_counts must be \(3,\) non-negative"):
        read_features(path)
