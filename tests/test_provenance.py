"""Provenance helpers and atomic writes: versions, file digests, plain JSON, rename-on-success."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from decouple.atomic import atomic_path, write_text_atomic
from decouple.provenance import file_sha256, jsonable, package_versions, utc_now


def test_package_versions_name_python_and_packages():
    import torch

    versions = package_versions()
    assert {"python", "decouple", "torch", "numpy", "h5py"} <= set(versions)
    assert versions["torch"] == torch.__version__  # a loaded module keeps its build tag


def test_file_sha256(tmp_path):
    (tmp_path / "f").write_bytes(b"abc" * 1000)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(b"abc" * 1000).hexdigest()
    assert file_sha256(tmp_path / "f", chunk_size=7) == hashlib.sha256(b"abc" * 1000).hexdigest()


def test_utc_now_is_iso_8601_utc():
    assert utc_now().endswith("+00:00") and "T" in utc_now()


def test_jsonable_gives_plain_types():
    value = {
        1: (np.float32(0.5), np.int64(3)),
        "array": np.arange(3),
        "path": Path("a/b.h5"),
        "nested": {"nan": float("nan"), "inf": np.float64("inf"), "none": None, "flag": True},
    }
    expected = {
        "1": [0.5, 3],
        "array": [0, 1, 2],
        "path": "a/b.h5",
        "nested": {"nan": None, "inf": None, "none": None, "flag": True},
    }
    assert jsonable(value) == expected
    assert json.loads(json.dumps(jsonable(value), allow_nan=False)) == expected


def test_jsonable_can_keep_nonfinite_for_the_caller_to_refuse():
    kept = jsonable({"x": np.array([1.0, np.nan])}, nonfinite_to_none=False)
    assert kept["x"][0] == 1.0 and math.isnan(kept["x"][1])
    with pytest.raises(ValueError):
        json.dumps(kept, allow_nan=False)


def test_atomic_path_renames_on_success_and_cleans_up_on_error(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    assert write_text_atomic(target, "one\r\n") == target
    assert target.read_bytes() == b"one\r\n"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_bytes() == b"one\r\n"
    assert sorted(path.name for path in target.parent.iterdir()) == ["out.txt"]


def test_atomic_writes_flush_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    import os
    import stat

    import decouple.atomic

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        info = os.fstat(descriptor)
        events.append(("fsync", "folder" if stat.S_ISDIR(info.st_mode) else "file", info.st_ino))
        real_fsync(descriptor)

    def replace(source, destination):
        events.append(("replace", os.stat(source).st_ino))
        real_replace(source, destination)

    monkeypatch.setattr(decouple.atomic.os, "fsync", fsync)
    monkeypatch.setattr(decouple.atomic.os, "replace", replace)
    target = tmp_path / "out.txt"
    write_text_atomic(target, "durable")
    file_inode, folder_inode = target.stat().st_ino, tmp_path.stat().st_ino
    assert events == [("fsync", "file", file_inode), ("replace", file_inode), ("fsync", "folder", folder_inode)]
