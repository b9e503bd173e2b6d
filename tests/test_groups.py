"""Group-aware splits (--group-by, a manifest's group column): carved splits are
group-disjoint from train; without groups the splits are exactly those of before."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, Set

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli.main import cli
from decouple.errors import ConfigError, DataError
from decouple.profiles import exponential_counts
from decouple.stage_one.manifest import Manifest, SplitItems, read_manifest, save_manifest
from decouple.stage_one.sources import SourceData, load_source
from decouple.stage_one.splits import SplitOptions, build_manifest, group_carve, prepare_manifest

TRACK = r"^(\d+)_"


def make_tracks(root: Path, *, classes: int = 3, tracks: int = 8, frames: int = 5) -> Path:
    """ROOT/class_<c>/<track>_<frame>.png: track c*tracks+t (unique over classes), tiny images."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        for t in range(tracks):
            for f in range(frames):
                pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{c * tracks + t:05d}_{f:05d}.png")
    return root


def track_of(ref: str) -> str:
    return Path(ref).name.split("_")[0]


def splits_of_each_track(manifest: Manifest) -> Dict[str, Set[str]]:
    """track -> the splits holding its frames (test_lt, a subset of test, counts as test)."""
    found: Dict[str, Set[str]] = {}
    for name, items in manifest.splits.items():
        for ref in items.refs:
            found.setdefault(track_of(ref), set()).add("test" if name == "test_lt" else name)
    return found


def assert_no_track_spans_splits(manifest: Manifest) -> None:
    spanning = {track: sorted(s) for track, s in splits_of_each_track(manifest).items() if len(s) > 1}
    assert not spanning, f"tracks in two splits: {spanning}"


@pytest.fixture(scope="module")
def tracks(tmp_path_factory) -> Path:
    return make_tracks(tmp_path_factory.mktemp("tracks") / "tracks")


# --------------------------------------------------------------------------- without groups: unchanged


def synthetic_source(base: Path, *, unsplit: bool) -> SourceData:
    """Five classes of 40, 25, 12, 6 and 2 references (no files needed to split)."""
    counts = [40, 25, 12, 6, 2]
    refs = [f"{base}/class_{c}/{c * 100 + j // 5:05d}_{j % 5:05d}.png" for c, n in enumerate(counts) for j in range(n)]
    labels = [c for c, n in enumerate(counts) for _ in range(n)]
    names = [f"class_{c}" for c in range(len(counts))]
    if unsplit:
        return SourceData(names, {"all": SplitItems(refs, labels)}, str(base))
    test = [ref.replace("_000", "_100", 1) for ref in refs]
    return SourceData(names, {"train": SplitItems(refs, labels), "test": SplitItems(test, labels)}, str(base))


# Digests of the manifest and of its CSV, taken from the code before groups existed.
@pytest.mark.parametrize(
    "unsplit, options, manifest_sha256, csv_sha256",
    [
        (
            True, SplitOptions(seed=3, val_fraction=0.2, test_fraction=0.2),
            "b198522e2e398e87c26f5a0bfe9566156cf831b6a479e6fe3b29a718a294f456",
            "1029bd0dded4adfc612c8d11269085b2c2aba0f514a6858f77a0d62e8ef4c056",
        ),
        (
            False, SplitOptions(seed=1, imbalance=10, val_per_class=1),
            "72a93f325deaece54a2f801420db37da893d3be223236f1af36a755011e18368",
            "1d52e0584cbe9e182db8d9f44b324775cee01bc1f265357fd57f962c5449e8f0",
        ),
    ],
    ids=["stratified", "long_tail"],
)
def test_without_groups_the_splits_and_hashes_are_those_of_before(
    tmp_path, unsplit, options, manifest_sha256, csv_sha256
):
    manifest = build_manifest(synthetic_source(tmp_path / "data", unsplit=unsplit), options)
    assert not manifest.has_groups and "groups" not in manifest.info
    assert manifest.sha256() == manifest_sha256
    path = save_manifest(manifest, tmp_path / "run.manifest.csv")
    assert path.read_text().splitlines()[0] == "path,label,split"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == csv_sha256


# --------------------------------------------------------------------------- --group-by


def test_group_by_keeps_every_track_in_one_split(tracks):
    manifest = prepare_manifest(tracks, SplitOptions(group_by=TRACK, val_fraction=0.2, test_fraction=0.2, seed=0))
    assert_no_track_spans_splits(manifest)
    assert list(manifest.splits) == ["train", "val", "test"]
    for name in ("train", "val", "test"):
        assert (manifest.counts(name) > 0).all(), name
    # whole groups: each class gives one track (5 frames) to test (target 0.2 * 40 = 8 -> 2 tracks) ...
    np.testing.assert_array_equal(manifest.counts("test"), [10, 10, 10])
    assert sum(len(items) for items in manifest.splits.values()) == 3 * 8 * 5
    assert manifest.info["groups"] == {
        "from": f"--group-by {TRACK}", "count": 24, "spanning_classes": 0, "classes_missing": {},
    }
    # the groups travel with the images
    for items in manifest.splits.values():
        assert items.groups == [f"{label}:{track_of(ref)}" for ref, label in zip(items.refs, items.labels.tolist())]


def test_without_group_by_the_same_folder_leaks_tracks(tracks):
    """What --group-by cures (and proof that the check above can fail)."""
    manifest = prepare_manifest(tracks, SplitOptions(val_fraction=0.2, test_fraction=0.2, seed=0))
    with pytest.raises(AssertionError, match="tracks in two splits"):
        assert_no_track_spans_splits(manifest)


def test_group_by_with_imbalance_carves_val_by_tracks_then_subsamples_train_by_images(tracks):
    manifest = prepare_manifest(tracks, SplitOptions(group_by=TRACK, imbalance=4, val_per_class=3, seed=2))
    assert_no_track_spans_splits(manifest)
    assert list(manifest.splits) == ["train", "val", "test", "test_lt"]
    np.testing.assert_array_equal(manifest.counts("val"), [3, 3, 3])  # trimmed to exactly --val-per-class
    n_max = manifest.info["profile"]["n_max"]
    # 40 per class: 2 tracks to test, 1 to val, so 25 images left for the profile's head class
    assert n_max == 25
    np.testing.assert_array_equal(manifest.counts("train"), exponential_counts(n_max, 3, 4))
    np.testing.assert_array_equal(manifest.counts("test_lt"), exponential_counts(10, 3, 4))
    # every val image comes from a track that gave nothing to train
    train_tracks = {track_of(ref) for ref in manifest.splits["train"].refs}
    assert not train_tracks & {track_of(ref) for ref in manifest.splits["val"].refs}


def test_group_splits_are_seeded(tracks):
    data = load_source(tracks)
    first, again, other = (
        build_manifest(data, SplitOptions(group_by=TRACK, seed=seed)) for seed in (5, 5, 6)
    )
    assert first.sha256() == again.sha256() != other.sha256()


def test_a_name_the_regex_does_not_match_is_named(tmp_path):
    root = make_tracks(tmp_path / "t", classes=2, tracks=2, frames=2)
    Image.new("RGB", (8, 8)).save(root / "class_1" / "stray.png")
    with pytest.raises(DataError, match=r"stray.png: file name 'stray.png' does not match --group-by '\^\(\\d\+\)_' "
                                        r"\(1 of 9 images do not\)"):
        prepare_manifest(root, SplitOptions(group_by=TRACK))


@pytest.mark.parametrize(
    "pattern, message",
    [(r"^\d+_", "has no capture group"), (r"^(\d+_", "is not a regular expression")],
)
def test_group_by_is_checked_with_the_options(pattern, message):
    with pytest.raises(ConfigError, match=rf"--group-by .* {message}"):
        SplitOptions(group_by=pattern)


def test_too_few_groups_for_a_balanced_val_names_the_class(tmp_path):
    root = make_tracks(tmp_path / "t", classes=2, tracks=4, frames=3)
    for index, frame in enumerate(sorted((root / "class_1").iterdir())):  # class_1: one track, kept for training
        frame.rename(frame.with_name(f"00009_{index:05d}.png"))
    with pytest.raises(DataError, match=r"class 'class_1' has 12 images in 1 group\(s\).*lower --val-per-class"):
        build_manifest(load_source(root), SplitOptions(group_by=TRACK, imbalance=2, val_per_class=2, test_fraction=0))


def test_a_group_spanning_classes_moves_whole_with_its_majority_class():
    # group "x": 3 images of class 0 and 1 of class 1; the rest are singletons
    labels = np.array([0, 0, 0, 1] + [0] * 6 + [1] * 6)
    groups = ["x"] * 4 + [f"a{i}" for i in range(6)] + [f"b{i}" for i in range(6)]
    for seed in range(20):
        kept, carved = group_carve(labels, groups, 2, targets=np.array([3, 3]), seed=seed)
        assert len(np.intersect1d(kept, carved)) == 0 and len(kept) + len(carved) == len(labels)
        inside = np.isin(np.arange(4), carved)
        assert inside.all() or not inside.any()  # the group moved whole
        assert (np.bincount(labels[carved], minlength=2) >= 3).all()
        assert (np.bincount(labels[kept], minlength=2) >= 1).all()
    refs = [f"/d/{group}_{i}.png" for i, group in enumerate(groups)]
    data = SourceData(["a", "b"], {"all": SplitItems(refs, labels, groups)}, "/d")
    assert build_manifest(data).info["groups"]["spanning_classes"] == 1


# --------------------------------------------------------------------------- the manifest's group column


def test_manifest_with_groups_round_trips_and_reproduces_the_split(tracks, tmp_path):
    manifest = prepare_manifest(tracks, SplitOptions(group_by=TRACK, imbalance=4, val_per_class=3, seed=1))
    path = save_manifest(manifest, tmp_path / "run.manifest.csv")
    lines = path.read_text().splitlines()
    assert lines[0] == "path,label,split,group"
    assert lines[1].split(",")[3].split(":", 1)[1] == track_of(lines[1].split(",")[0])
    back = read_manifest(path)
    for name, items in manifest.splits.items():
        assert back.splits[name].groups == items.groups
    again = build_manifest(load_source(path), SplitOptions(seed=99))
    assert again.sha256() == manifest.sha256()
    # groups enter the digest only when there are some
    stripped = Manifest(manifest.class_names, {k: SplitItems(v.refs, v.labels) for k, v in manifest.splits.items()})
    assert stripped.sha256() != manifest.sha256()


def test_a_group_column_in_a_user_manifest_groups_the_carve(tracks, tmp_path):
    rows = ["path,group,label"]  # a header naming the columns, in its own order
    for ref in sorted(tracks.rglob("*.png")):
        # --group-by names a group "<class index>:<capture>" (class_<c> is class c)
        rows.append(f"{ref.relative_to(tracks.parent)},{ref.parent.name[6:]}:{track_of(str(ref))},{ref.parent.name}")
    csv_path = tracks.parent / "tracks.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    manifest = prepare_manifest(csv_path, SplitOptions(val_fraction=0.2, test_fraction=0.2))
    assert manifest.info["groups"]["from"] == "manifest group column"
    assert_no_track_spans_splits(manifest)
    # --group-by on the same files gives the same split
    by_name = prepare_manifest(tracks, SplitOptions(group_by=TRACK, val_fraction=0.2, test_fraction=0.2))
    assert manifest.sha256() == by_name.sha256()


def test_old_manifests_read_as_before_and_a_missing_group_is_named(tmp_path):
    (tmp_path / "old.csv").write_text("path,label,split\na.png,cat,train\nb.png,dog,test\n")
    assert not read_manifest(tmp_path / "old.csv").has_groups
    (tmp_path / "two.csv").write_text("a.png,cat\nb.png,dog\n")
    assert not read_manifest(tmp_path / "two.csv").has_groups
    (tmp_path / "four.csv").write_text("a.png,cat,train,g1\nb.png,dog,test,g2\n")
    assert read_manifest(tmp_path / "four.csv").splits["test"].groups == ["g2"]
    (tmp_path / "gap.csv").write_text("a.png,cat,train,g1\nb.png,dog,test\n")
    with pytest.raises(DataError, match=r"gap.csv: line 2 has no group"):
        read_manifest(tmp_path / "gap.csv")


# --------------------------------------------------------------------------- the command


@pytest.mark.usefixtures("one_torch_thread")
def test_extract_group_by_on_the_command_line(tracks, tmp_path):
    args = [
        "extract", "--data", str(tracks), "--backbone", "test_resnet", "--epochs", "0", "--batch-size", "16",
        "--features-dir", str(tmp_path), "--no-progress", "--json", "--group-by", TRACK,
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    manifest = read_manifest(Path(summary["manifest_path"]))
    assert manifest.has_groups and set(manifest.splits) == {"train", "val", "test"}
    assert_no_track_spans_splits(manifest)

    bad = make_tracks(tmp_path / "bad", classes=2, tracks=2, frames=2)
    Image.new("RGB", (8, 8)).save(bad / "class_0" / "frame.png")
    result = CliRunner().invoke(cli, args[:2] + [str(bad)] + args[3:])
    assert result.exit_code == 2
    assert "frame.png: file name 'frame.png' does not match --group-by" in result.output


def test_track_numbers_that_restart_in_every_class_stay_apart(tmp_path):
    """GTSRB numbers tracks from 0 in every class folder: --group-by groups
    within a class, so track 0 of one class is not track 0 of another, and
    every class still gets its share of val and test."""
    rng = np.random.default_rng(0)
    for c in range(4):
        folder = tmp_path / "data" / f"class_{c}"
        folder.mkdir(parents=True)
        for t in range(6):
            for f in range(5):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{t:05d}_{f:05d}.png")
    manifest = prepare_manifest(tmp_path / "data", SplitOptions(group_by=TRACK, val_fraction=0.2, test_fraction=0.2))
    for name in ("val", "test"):
        assert (manifest.counts(name) > 0).all(), name
    assert manifest.info["groups"]["count"] == 24 and manifest.info["groups"]["classes_missing"] == {}
    found: Dict[str, Set[str]] = {}
    for name, items in manifest.splits.items():
        for ref, label in zip(items.refs, items.labels.tolist()):
            found.setdefault(f"{label}:{track_of(ref)}", set()).add("test" if name == "test_lt" else name)
    assert all(len(splits) == 1 for splits in found.values())


def test_a_class_in_one_group_is_reported_missing_from_val(tmp_path):
    rng = np.random.default_rng(0)
    for c, tracks in enumerate((6, 1)):
        folder = tmp_path / "data" / f"class_{c}"
        folder.mkdir(parents=True)
        for t in range(tracks):
            for f in range(5):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{t:05d}_{f:05d}.png")
    manifest = prepare_manifest(tmp_path / "data", SplitOptions(group_by=TRACK, val_fraction=0.2, test_fraction=0.2))
    assert manifest.info["groups"]["classes_missing"] == {"val": ["class_1"], "test": ["class_1"]}
