"""The real CIFAR-10 JPEGs of ../shared/data for the benchmarks: the first
N images of every class, unpacked as a split-folders tree."""

from __future__ import annotations

import tarfile
from pathlib import Path

TARBALL = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.tar.xz"


def unpack_cifar(dest: Path, *, train_per_class: int, test_per_class: int) -> Path:
    """``dest/cifar10/{train,test}/<class>/NNNN.jpg``, the first
    ``train_per_class`` / ``test_per_class`` of each class; returns ``dest/cifar10``."""
    train_wanted = {f"{i:04d}.jpg" for i in range(train_per_class)}
    test_wanted = {f"{i:04d}.jpg" for i in range(test_per_class)}
    with tarfile.open(TARBALL, "r:xz") as archive:
        members = [
            m for m in archive if m.isfile() and (
                ("/train/" in m.name and Path(m.name).name in train_wanted)
                or ("/test/" in m.name and Path(m.name).name in test_wanted)
            )
        ]
        archive.extractall(dest, members=members, filter="data")
    return dest / "cifar10"
