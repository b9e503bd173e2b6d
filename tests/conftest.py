"""Shared fixtures: a long-tailed Gaussian feature set and its HDF5 file, and
one torch thread for modules that run models.

``gaussian_long_tailed()`` defaults: 20 classes in 32 dimensions, training
counts 500 down to 5 on the exponential profile (imbalance factor 100),
balanced val (50 per class) and test (100 per class).
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from decouple.features import write_features
from decouple.synthetic import gaussian_long_tailed


TARBALL = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.tar.xz"
PER_CLASS = 20  # images per class and split taken from the tarball


@pytest.fixture(scope="session")
def cifar_subset(tmp_path_factory) -> Path:
    """cifar10/{train,test}/<class>/00NN.jpg, the first PER_CLASS of each class
    of the real CIFAR-10 JPEGs in ../shared/data (CI fails without them)."""
    if not TARBALL.exists():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{TARBALL} not present: CI must run the stage-one tests on real images")
        pytest.skip(f"{TARBALL} not present")
    root = tmp_path_factory.mktemp("cifar")
    wanted = {f"{i:04d}.jpg" for i in range(PER_CLASS)}
    with tarfile.open(TARBALL, "r:xz") as archive:
        members = [m for m in archive if m.isfile() and Path(m.name).name in wanted]
        archive.extractall(root, members=members, filter="data")
    return root / "cifar10"


@pytest.fixture
def one_torch_thread():
    """One torch intra-op thread for the test, restored afterwards (modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def gaussian_data():
    """(FeatureSet, true class means (C, D)) of the default Gaussian long-tailed data."""
    return gaussian_long_tailed()


@pytest.fixture(scope="session")
def gaussian_feature_set(gaussian_data):
    """The default Gaussian long-tailed FeatureSet (train, val, test)."""
    return gaussian_data[0]


@pytest.fixture(scope="session")
def gaussian_features(gaussian_data, tmp_path_factory):
    """Path (str) of the default Gaussian long-tailed data written as a v1 feature file."""
    path = tmp_path_factory.mktemp("features") / "gaussian_lt.h5"
    write_features(path, gaussian_data[0])
    return str(path)
