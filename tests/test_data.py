"""Data sources, the long-tailed profile, val / test / test_lt carving, the manifest."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from decouple.errors import ConfigError, DataError
from decouple.profiles import exponential_counts
from decouple.stage_one.images import load_image, native_image_size
from decouple.stage_one.manifest import SplitItems, read_manifest, save_manifest
from decouple.stage_one.sources import SOURCES, Source, SourceData, detect_source, load_source, register_source
from decouple.stage_one.splits import SplitOptions, build_manifest, long_tail_counts, prepare_manifest


def make_folder(root: Path, counts, *, size: int = 8, ext: str = ".png") -> Path:
    """ROOT/class_<i>/<j>.png with counts[i] tiny images each."""
    rng = np.random.default_rng(0)
    for index, count in enumerate(counts):
        folder = root / f"class_{index}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(count):
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{j:03d}{ext}")
    return root


@pytest.fixture(scope="module")
def balanced_split(tmp_path_factory) -> Path:
    """ROOT/train (40 per class) and ROOT/test (12 per class), 5 classes."""
    root = tmp_path_factory.mktemp("split")
    make_folder(root / "train", [40] * 5)
    make_folder(root / "test", [12] * 5)
    return root


def test_sources_are_a_registry():
    assert set(SOURCES) == {"manifest", "image_folder", "split_folders", "cifar"}


def test_long_tail_train_follows_the_exponential_profile_and_val_is_balanced(balanced_split):
    manifest = build_manifest(load_source(balanced_split), SplitOptions(imbalance=10, val_per_class=4, seed=0))
    assert list(manifest.splits) == ["train", "val", "test", "test_lt"]
    assert detect_source(balanced_split) == "split_folders"
    # n_max defaults to the largest head count that still leaves 4 images per class for val
    np.testing.assert_array_equal(manifest.counts("train"), exponential_counts(36, 5, 10))
    np.testing.assert_array_equal(manifest.counts("val"), [4] * 5)
    np.testing.assert_array_equal(manifest.counts("test"), [12] * 5)
    np.testing.assert_array_equal(manifest.counts("test_lt"), exponential_counts(12, 5, 10))
    train, val = set(manifest.splits["train"].refs), set(manifest.splits["val"].refs)
    assert not train & val
    assert set(manifest.splits["test_lt"].refs) <= set(manifest.splits["test"].refs)
    assert manifest.info["profile"]["n_max"] == 36


def test_splits_are_seeded(balanced_split):
    data = load_source(balanced_split)
    first = build_manifest(data, SplitOptions(imbalance=10, val_per_class=4, seed=3))
    again = build_manifest(data, SplitOptions(imbalance=10, val_per_class=4, seed=3))
    other = build_manifest(data, SplitOptions(imbalance=10, val_per_class=4, seed=4))
    assert first.splits["train"].refs == again.splits["train"].refs
    assert first.sha256() == again.sha256() != other.sha256()


def test_explicit_n_max_gives_the_literature_counts():
    counts = long_tail_counts(np.full(10, 5000), 100, n_max=5000)
    assert counts.sum() == 12406  # CIFAR-10-LT, imbalance 100 (Cao et al. 2019)


def test_profile_asking_more_than_the_pool_names_the_class(balanced_split):
    with pytest.raises(DataError, match=r"class 'class_0' has 40 images; the profile \(n_max=40.*asks 40 plus 4 for val"):
        build_manifest(load_source(balanced_split), SplitOptions(imbalance=10, n_max=40, val_per_class=4))


def test_unsplit_folder_carves_test_and_stratified_val(tmp_path):
    root = make_folder(tmp_path / "natural", [30, 10, 3, 1])
    assert detect_source(root) == "image_folder"
    manifest = prepare_manifest(root, SplitOptions(val_fraction=0.2, min_val_per_class=1, test_fraction=0.2))
    train, val, test = (manifest.counts(s) for s in ("train", "val", "test"))
    np.testing.assert_array_equal(test, [6, 2, 1, 0])  # never a class's last image
    np.testing.assert_array_equal(val, [5, 2, 1, 0])
    assert (train >= 1).all() and (train + val + test == [30, 10, 3, 1]).all()
    assert "test_lt" not in manifest.splits  # natural data: no synthetic profile


def test_manifest_round_trip_and_reuse_as_source(balanced_split, tmp_path):
    manifest = build_manifest(load_source(balanced_split), SplitOptions(imbalance=5, val_per_class=2, seed=1))
    path = save_manifest(manifest, tmp_path / "out" / "run.manifest.csv")
    assert path.read_text().splitlines()[0] == "path,label,split"
    back = read_manifest(path)
    assert back.class_names == manifest.class_names
    for name, items in manifest.splits.items():
        assert [Path(r).resolve() for r in back.splits[name].refs] == [Path(r).resolve() for r in items.refs]
        np.testing.assert_array_equal(back.splits[name].labels, items.labels)
    # a saved manifest is a source: its splits come back unchanged
    again = build_manifest(load_source(path), SplitOptions(seed=99))
    np.testing.assert_array_equal(again.counts("test_lt"), manifest.counts("test_lt"))


def test_user_manifest_without_splits(tmp_path):
    root = make_folder(tmp_path / "imgs", [6, 6])
    rows = [f"imgs/class_{c}/{j:03d}.png,{'cat' if c else 'dog'}" for c in range(2) for j in range(6)]
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    manifest = prepare_manifest(csv_path)
    assert manifest.class_names == ["cat", "dog"]
    assert sum(len(items) for items in manifest.splits.values()) == 12
    assert root.exists()


def test_manifest_bad_line_is_named(tmp_path):
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("path,label,split\na.png,cat,train\nb.png\n")
    with pytest.raises(DataError, match=r"bad.csv: line 3 has 1 fields; expected path,label\[,split\]"):
        load_source(csv_path)
    csv_path.write_text("a.png,cat,holdout\n")
    with pytest.raises(DataError, match="split 'holdout'"):
        load_source(csv_path)


def test_cifar_python_pickles(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    with open(root / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": [b"plane", b"car", b"bird"]}, handle)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 255, (6, 3072), dtype=np.uint8)
        with open(root / name, "wb") as handle:
            pickle.dump({b"data": data, b"labels": [0, 1, 2, 0, 1, 2]}, handle)
    assert detect_source(root) == "cifar"
    manifest = build_manifest(load_source(root), SplitOptions(imbalance=2, val_per_class=1))
    assert manifest.class_names == ["plane", "car", "bird"]
    np.testing.assert_array_equal(manifest.counts("train"), exponential_counts(9, 3, 2))
    image = load_image(manifest.splits["train"].refs[0])
    assert image.size == (32, 32) and image.mode == "RGB"
    with open(root / "test_batch", "rb") as handle:
        first = pickle.load(handle)[b"data"][0]
    np.testing.assert_array_equal(np.asarray(load_image(f"{root / 'test_batch'}#0")), first.reshape(3, 32, 32).transpose(1, 2, 0))


def test_empty_class_folder_is_named(tmp_path):
    root = make_folder(tmp_path / "d", [3, 3])
    (root / "empty_class").mkdir()
    (root / "empty_class" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"empty_class: class folder 'empty_class' holds no images"):
        load_source(root)


def test_single_class_is_refused(tmp_path):
    root = make_folder(tmp_path / "one", [5])
    with pytest.raises(DataError, match="a single class 'class_0'; recognition needs at least two"):
        load_source(root)


def test_corrupt_images_are_skipped_and_listed_or_fatal_when_strict(tmp_path):
    root = make_folder(tmp_path / "c", [8, 8])
    (root / "class_1" / "broken.png").write_bytes(b"not an image")
    good = root / "class_0" / "000.png"
    (root / "class_0" / "truncated.png").write_bytes(good.read_bytes()[:40])
    manifest = prepare_manifest(root, SplitOptions(test_fraction=0.25))
    skipped = manifest.info["skipped_images"]
    assert sorted(Path(p).name for p in skipped) == ["broken.png", "truncated.png"]
    assert not any(ref in skipped for items in manifest.splits.values() for ref in items.refs)
    with pytest.raises(DataError, match=r"(broken|truncated).png: cannot be decoded .*fatal under --strict"):
        prepare_manifest(root, SplitOptions(test_fraction=0.25), strict=True)


def test_missing_data_path(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        load_source(tmp_path / "nowhere")


# --------------------------------------------------------------------------- the source registry


def write_cifar10_pickles(root: Path) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(root / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": [b"plane", b"car", b"bird"]}, handle)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(root / name, "wb") as handle:
            pickle.dump({b"data": rng.integers(0, 255, (6, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 0, 1, 2]}, handle)
    return root


def write_manifest_csv(root: Path) -> Path:
    make_folder(root / "imgs", [3, 3])
    rows = [f"imgs/class_{c}/{j:03d}.png,{c}" for c in range(2) for j in range(3)]
    (root / "list.csv").write_text("\n".join(rows) + "\n")
    return root / "list.csv"


#: One sample of each registered source; a new source adds its own here.
SOURCE_SAMPLES = {
    "manifest": write_manifest_csv,
    "image_folder": lambda root: make_folder(root / "folder", [3, 3]),
    "split_folders": lambda root: make_folder(make_folder(root / "split" / "train", [3, 3]).parent / "test", [2, 2]).parent,
    "cifar": lambda root: write_cifar10_pickles(root / "cifar-10-batches-py"),
}


@pytest.mark.parametrize("name", SOURCES.names())
def test_every_source_detects_its_sample_and_decodes_its_images(name, tmp_path):
    assert name in SOURCE_SAMPLES, f"source {name!r} needs a sample in SOURCE_SAMPLES"
    cls = SOURCES.get(name)
    assert issubclass(cls, Source)
    assert cls.detect.__func__ is not Source.detect.__func__ and cls.load.__func__ is not Source.load.__func__
    path = SOURCE_SAMPLES[name](tmp_path)
    assert detect_source(path) == name
    data = load_source(path)
    assert len(data.class_names) >= 2
    for items in data.splits.values():
        assert len(items) and load_image(items.refs[0]).mode == "RGB"


def test_a_new_source_is_one_registered_class(tmp_path, monkeypatch):
    """Detection, splitting and decoding reach a source registered here, with no other edit."""
    monkeypatch.setattr(SOURCES, "_entries", dict(SOURCES._entries))
    monkeypatch.setattr(SOURCES, "_descriptions", dict(SOURCES._descriptions))

    @register_source("toy_stack")
    class ToyStack(Source):
        """An .npz of images (N, 8, 8, 3) and labels (N,); references FILE@INDEX."""

        @classmethod
        def detect(cls, path: Path) -> bool:
            return path.suffix == ".npz"

        @classmethod
        def load(cls, path: Path) -> SourceData:
            labels = np.load(path)["labels"]
            refs = [f"{path}@{i}" for i in range(len(labels))]
            return SourceData(["even", "odd"], {"all": SplitItems(refs, labels)}, str(path))

        @classmethod
        def decodes(cls, ref: str) -> bool:
            return "@" in ref

        @classmethod
        def load_image(cls, ref: str) -> Image.Image:
            file_part, index = ref.rsplit("@", 1)
            return Image.fromarray(np.load(file_part)["images"][int(index)])

    path = tmp_path / "stack.npz"
    images = np.random.default_rng(0).integers(0, 255, (20, 8, 8, 3), dtype=np.uint8)
    np.savez(path, images=images, labels=np.arange(20) % 2)
    assert detect_source(path) == "toy_stack"
    manifest = prepare_manifest(path, SplitOptions(test_fraction=0.25))
    assert manifest.info["skipped_images"] == [] and len(manifest.splits["test"]) == 4  # round(2.5) per class
    ref = manifest.splits["train"].refs[0]
    np.testing.assert_array_equal(np.asarray(load_image(ref)), images[int(ref.rsplit("@", 1)[1])])
    assert native_image_size(manifest.splits["train"].refs) == 8


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(imbalance=0.5), "--imbalance must be >= 1; got 0.5"),
        (dict(n_max=0), "--n-max must be >= 1; got 0"),
        (dict(val_per_class=-1), "--val-per-class must be >= 0; got -1"),
        (dict(val_fraction=1.0), r"--val-fraction must lie in \[0, 1\); got 1.0"),
        (dict(test_fraction=-0.1), r"--test-fraction must lie in \[0, 1\); got -0.1"),
    ],
)
def test_split_options_are_checked_once_naming_the_option(options, message):
    with pytest.raises(ConfigError, match=message):
        SplitOptions(**options)
