"""The feature file: round trip, and every bad input of issue 2 through
`decouple head` and `decouple info`: one line naming file and field, exit 2,
nothing written."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import cli
from decouple.errors import FeatureFileError
from decouple.features import FeatureWriter, read_features, read_train_counts, summarize, write_features


def _write_raw(path, *, train=True, n_labels=None, label_max=None, nan=False, attrs=True):
    rng = np.random.default_rng(0)
    features = rng.standard_normal((30, 4)).astype(np.float32)
    labels = np.arange(30) % 3
    if nan:
        features[7, 2] = np.nan
    if label_max is not None:
        labels[5] = label_max
    if n_labels is not None:
        labels = labels[:n_labels]
    with h5py.File(path, "w") as handle:
        if attrs:
            handle.attrs["format"] = "decouple-features"
            handle.attrs["version"] = 1
            handle.attrs["backbone"] = "test"
            handle.attrs.create("class_names", ["a", "b", "c"], dtype=h5py.string_dtype())
        group = handle.create_group("train" if train else "training")
        group.create_dataset("features", data=features)
        group.create_dataset("labels", data=labels)
    return str(path)


def _truncated(path, source):
    shutil.copy(source, path)
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)
    return str(path)


BAD_FILES = {
    "missing file": (lambda tmp, good: str(tmp / "absent.h5"), "no such feature file"),
    "not HDF5": (lambda tmp, good: _text(tmp / "notes.h5"), "cannot be read as HDF5"),
    "truncated": (lambda tmp, good: _truncated(tmp / "cut.h5", good), r"HDF5 file is truncated \(\d+ of \d+ bytes\)"),
    "no /train": (lambda tmp, good: _write_raw(tmp / "notrain.h5", train=False), "no /train group"),
    "length mismatch": (lambda tmp, good: _write_raw(tmp / "len.h5", n_labels=29), r"/train/features has 30 rows but /train/labels has 29"),
    "labels out of range": (lambda tmp, good: _write_raw(tmp / "range.h5", label_max=3), r"/train/labels must lie in \[0, 3\); got .*max 3"),
    "NaN features": (lambda tmp, good: _write_raw(tmp / "nan.h5", nan=True), r"/train/features must be finite; row 7"),
    "wrong format": (lambda tmp, good: _write_raw(tmp / "noattrs.h5", attrs=False), "attribute format must be 'decouple-features'"),
}


def _text(path):
    path.write_text("not an HDF5 file\n")
    return str(path)


def _check_one_line_error(result, path, pattern):
    import re

    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert path in lines[0]
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize("case", list(BAD_FILES))
@pytest.mark.parametrize("command", ["head", "info"])
def test_bad_feature_file_is_one_line_exit_2(case, command, tmp_path, gaussian_features):
    make, pattern = BAD_FILES[case]
    path = make(tmp_path, gaussian_features)
    output = tmp_path / "results.jsonl"
    args = ["head", "--features", path, "--output", str(output)] if command == "head" else ["info", path]
    result = CliRunner().invoke(cli, args)
    _check_one_line_error(result, path, pattern)
    assert not output.exists()


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--loss", "balanced_sofmax"], r"unknown loss 'balanced_sofmax'.*balanced_softmax.*logit_adjusted"),
        (["--sampler", "balanced"], r"unknown sampler 'balanced'.*instance, class_balanced, square_root, progressive, calibrated_features"),
        (["--head", "tau"], r"unknown head 'tau'.*linear, cosine, tau_norm, posthoc_la, lws, disalign, ncm, knn"),
        (["--head", "ncm", "--loss", "ce"], r"head 'ncm' is training-free and takes no loss"),
        (["--head", "knn", "--sampler", "class_balanced"], r"head 'knn' is training-free and takes no sampler"),
    ],
)
def test_bad_names_and_combinations(args, pattern, tmp_path, gaussian_features):
    import re

    output = tmp_path / "results.jsonl"
    result = CliRunner().invoke(cli, ["head", "--features", gaussian_features, "--output", str(output)] + args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and re.search(pattern, lines[0]), result.output
    assert not output.exists()


def test_round_trip(tmp_path, gaussian_feature_set):
    path = write_features(tmp_path / "copy.h5", gaussian_feature_set, dtype=np.float16)
    loaded = read_features(path)
    assert loaded.class_names == gaussian_feature_set.class_names
    assert list(loaded.splits) == ["train", "val", "test"]
    for name, split in gaussian_feature_set.splits.items():
        np.testing.assert_array_equal(loaded.splits[name].labels, split.labels)
        np.testing.assert_allclose(loaded.splits[name].features, split.features, atol=1e-2)
        assert loaded.splits[name].features.dtype == np.float32
    summary = summarize(loaded)
    assert summary["train_counts"] == {"max": 500, "min": 5, "imbalance_factor": 100.0}
    assert summary["groups"] == {"many": 7, "medium": 7, "few": 6}


def test_views_are_written_and_ignored_by_the_reader(tmp_path, gaussian_feature_set):
    train = gaussian_feature_set.splits["train"]
    features = train.features.astype(np.float32)
    n, dim = features.shape
    views = np.stack([features + view for view in range(2)], axis=1)  # (N, 2, D)
    path = tmp_path / "views.h5"
    with FeatureWriter(path, class_names=gaussian_feature_set.class_names, backbone="test", dtype=np.float32) as writer:
        writer.write_split("train", features, train.labels)
        writer.create_views("train", n=n, views=2, dim=dim)
        for view in range(2):
            writer.write_view_rows("train", view, 0, views[: n // 2, view])
            writer.write_view_rows("train", view, n // 2, views[n // 2 :, view])
    with h5py.File(path, "r") as handle:
        np.testing.assert_array_equal(handle["train/views"][()], views)
    loaded = read_features(path)
    assert list(loaded.splits) == ["train"]
    np.testing.assert_array_equal(loaded.splits["train"].features, features)
    np.testing.assert_array_equal(loaded.splits["train"].labels, train.labels)


@pytest.mark.parametrize("case", ["missing file", "not HDF5", "no /train", "labels out of range", "wrong format"])
def test_read_train_counts_checks_what_read_features_checks(case, tmp_path, gaussian_features):
    # The sweep's class-count check reads only the header and /train/labels,
    # with the same checks and messages as a full read.
    make, pattern = BAD_FILES[case]
    path = make(tmp_path, gaussian_features)
    with pytest.raises(FeatureFileError, match=pattern):
        read_train_counts(path)
    with pytest.raises(FeatureFileError, match=pattern):
        read_features(path)


def test_read_train_counts_counts_the_training_labels(gaussian_features):
    labels = read_features(gaussian_features).splits["train"].labels
    np.testing.assert_array_equal(read_train_counts(gaussian_features), np.bincount(labels))
