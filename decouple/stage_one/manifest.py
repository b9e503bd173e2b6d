"""The manifest: class names and the final splits, saved as CSV ``path,label,split``.

A :class:`Manifest` records which image went to which split; it is saved beside
the features and can be read again as a data source. References are file
paths, or ``FILE#INDEX`` for an image inside a CIFAR python pickle.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from decouple.atomic import atomic_path, temporary_sibling
from decouple.errors import DataError

PathLike = Union[str, "os.PathLike[str]"]

SPLIT_NAMES = ("train", "val", "test", "test_lt")
MANIFEST_COLUMNS = ("path", "label", "split")


def is_indexed_ref(ref: str) -> bool:
    """True for a ``FILE#INDEX`` reference (an image inside a pickle file)."""
    return bool(re.search(r"#\d+$", ref))


def natural_key(name: str) -> Tuple:
    """Sort key that orders ``class_2`` before ``class_10``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


@dataclass
class SplitItems:
    """References (N,) and integer labels (N,) of one split."""

    refs: List[str]
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.refs)

    def subset(self, indices: Sequence[int]) -> "SplitItems":
        indices = np.asarray(indices, dtype=np.int64)
        return SplitItems([self.refs[i] for i in indices], self.labels[indices])


@dataclass
class Manifest:
    """Class names and the final splits, with how they were built in ``info``."""

    class_names: List[str]
    splits: Dict[str, SplitItems]
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def counts(self, split: str = "train") -> np.ndarray:
        """Images per class (C,) in ``split``."""
        return np.bincount(self.splits[split].labels, minlength=self.num_classes)

    def summary(self) -> Dict[str, Any]:
        """Split sizes and per-class counts, JSON-ready."""
        return {
            "class_names": list(self.class_names),
            "splits": {name: len(items) for name, items in self.splits.items()},
            "counts": {name: self.counts(name).tolist() for name in self.splits},
            **self.info,
        }

    def rows(self, *, relative_to: Optional[PathLike] = None) -> List[Tuple[str, str, str]]:
        base = os.path.abspath(relative_to) if relative_to is not None else None
        rows = []
        for split, items in self.splits.items():
            for ref, label in zip(items.refs, items.labels):
                path = ref
                if base is not None:
                    try:
                        path = os.path.relpath(ref, base)
                    except ValueError:  # another drive on Windows
                        path = ref
                rows.append((path, self.class_names[int(label)], split))
        return rows

    def sha256(self) -> str:
        """Digest of class names and (reference, label, split) rows, location-independent."""
        digest = hashlib.sha256("\n".join(self.class_names).encode("utf-8"))
        for split, items in self.splits.items():
            digest.update(split.encode())
            digest.update(items.labels.tobytes())
            digest.update("\n".join(os.path.basename(ref) for ref in items.refs).encode("utf-8"))
        return digest.hexdigest()


# --------------------------------------------------------------------------- writing


def save_manifest(manifest: Manifest, path: PathLike, *, staged: bool = False) -> Path:
    """Write ``path,label,split`` CSV (paths relative to the CSV's folder), atomically.

    ``staged``: write the complete file beside ``path`` and return that
    temporary path, for the caller to :func:`~decouple.atomic.commit` to
    ``path`` together with other files (or remove); ``path`` is untouched.
    """
    path = Path(path)
    if staged:
        tmp = temporary_sibling(path)
        _write_manifest_csv(manifest, tmp, relative_to=path.parent)
        return tmp
    with atomic_path(path) as tmp:
        _write_manifest_csv(manifest, tmp, relative_to=path.parent)
    return path


def _write_manifest_csv(manifest: Manifest, target: Path, *, relative_to: Path) -> None:
    try:
        with open(target, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(MANIFEST_COLUMNS)
            writer.writerows(manifest.rows(relative_to=relative_to))
    except BaseException:
        target.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- reading


def read_manifest(path: PathLike) -> Manifest:
    """Read a manifest CSV (``path,label[,split]``, header optional) as it stands;
    rows without a split form the split ``all``. Relative paths are relative to the CSV."""
    path = Path(path)
    rows = _read_manifest_rows(path)
    splits_present = {split for _, _, split in rows}
    if "all" in splits_present and len(splits_present) > 1:
        raise DataError(f"{path}: some rows name a split and some do not; give every row a split or none")
    class_names = sorted({label for _, label, _ in rows}, key=natural_key)
    index = {name: i for i, name in enumerate(class_names)}
    splits = {}
    for split in [s for s in SPLIT_NAMES + ("all",) if s in splits_present]:
        chosen = [(ref, index[label]) for ref, label, s in rows if s == split]
        splits[split] = SplitItems([ref for ref, _ in chosen], [label for _, label in chosen])
    return Manifest(class_names, splits, {"source": "manifest", "data": str(path)})


def _read_manifest_rows(path: Path) -> List[Tuple[str, str, str]]:
    """(absolute reference, label, split or ``all``) of every data line."""
    if not path.is_file():
        raise DataError(f"{path}: no such manifest file")
    base = path.parent.resolve()
    rows = [_parse_row(path, line_number, row, base) for line_number, row in manifest_lines(path)]
    if not rows:
        raise DataError(f"{path}: manifest holds no rows; expected path,label[,split] lines")
    return rows


def _parse_row(path: Path, line_number: int, row: List[str], base: Path) -> Tuple[str, str, str]:
    if len(row) not in (2, 3):
        raise DataError(f"{path}: line {line_number} has {len(row)} fields; expected path,label[,split]")
    ref, label = row[0].strip(), row[1].strip()
    split = row[2].strip() if len(row) == 3 and row[2].strip() else "all"
    if not ref or not label:
        raise DataError(f"{path}: line {line_number} has an empty path or label")
    if split not in SPLIT_NAMES + ("all",):
        raise DataError(
            f"{path}: line {line_number} has split {split!r}; expected one of {', '.join(SPLIT_NAMES)}"
        )
    return resolve_ref(ref, base), label, split


def manifest_lines(path: Path) -> Iterator[Tuple[int, List[str]]]:
    """(line number, fields) of every data line of a manifest CSV: blank
    lines, ``#`` comments and a ``path,...`` header skipped."""
    with open(path, newline="", encoding="utf-8") as handle:
        for line_number, row in enumerate(csv.reader(handle), start=1):
            if not row or not "".join(row).strip() or row[0].startswith("#"):
                continue
            if line_number == 1 and row[0].strip().lower() == "path":
                continue
            yield line_number, row


def resolve_ref(ref: str, base: Path) -> str:
    """A manifest's reference with a relative file part made relative to ``base``."""
    file_part = ref.split("#", 1)[0] if is_indexed_ref(ref) else ref
    return ref if os.path.isabs(file_part) else str(base / ref)
