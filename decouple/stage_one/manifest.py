"""The manifest: class names and the final splits, saved as CSV ``path,label,split[,group]``.

A :class:`Manifest` records which image went to which split; it is saved beside
the features and can be read again as a data source. References are file
paths, or ``FILE#INDEX`` for an image inside a CIFAR python pickle.

Groups (bursts, tracks, specimens: images that must share a split) are
optional: a manifest either gives every image a group or none. Only then is a
fourth column, ``group``, written, and only then does it enter
:meth:`Manifest.sha256`, so a manifest without groups hashes as it always did.
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
GROUP_COLUMN = "group"


def is_indexed_ref(ref: str) -> bool:
    """True for a ``FILE#INDEX`` reference (an image inside a pickle file)."""
    return bool(re.search(r"#\d+$", ref))


def natural_key(name: str) -> Tuple:
    """Sort key that orders ``class_2`` before ``class_10``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


@dataclass
class SplitItems:
    """References (N,), integer labels (N,) and, optionally, group names (N,) of one split."""

    refs: List[str]
    labels: np.ndarray
    groups: Optional[List[str]] = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.groups is not None and len(self.groups) != len(self.refs):
            raise ValueError(f"{len(self.groups)} groups for {len(self.refs)} references")

    def __len__(self) -> int:
        return len(self.refs)

    def subset(self, indices: Sequence[int]) -> "SplitItems":
        indices = np.asarray(indices, dtype=np.int64)
        groups = None if self.groups is None else [self.groups[i] for i in indices]
        return SplitItems([self.refs[i] for i in indices], self.labels[indices], groups)


@dataclass
class Manifest:
    """Class names and the final splits, with how they were built in ``info``."""

    class_names: List[str]
    splits: Dict[str, SplitItems]
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def train_profile(self) -> str:
        """``long_tailed`` or ``balanced`` (:data:`decouple.stage_one.splits.TRAIN_PROFILES`)."""
        return str(self.info.get("train_profile", "long_tailed"))

    @property
    def reference_counts(self) -> Optional[np.ndarray]:
        """The long-tailed profile's training counts (C,), where the splits were made on
        one: the counts the many / medium / few groups come from. None otherwise."""
        counts = self.info.get("reference_counts")
        return None if counts is None else np.asarray(counts, dtype=np.int64)

    @property
    def reference_source(self) -> Optional[str]:
        """One line naming the profile of :attr:`reference_counts` (None without them)."""
        return self.info.get("reference_source")

    @property
    def has_groups(self) -> bool:
        """True when the images carry groups (then every split has them)."""
        return any(items.groups is not None for items in self.splits.values())

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

    def columns(self) -> Tuple[str, ...]:
        """The CSV columns: ``path,label,split``, plus ``group`` when there are groups."""
        return MANIFEST_COLUMNS + ((GROUP_COLUMN,) if self.has_groups else ())

    def rows(self, *, relative_to: Optional[PathLike] = None) -> List[Tuple[str, ...]]:
        """One tuple per image, in :meth:`columns` order."""
        base = os.path.abspath(relative_to) if relative_to is not None else None
        with_groups = self.has_groups
        rows: List[Tuple[str, ...]] = []
        for split, items in self.splits.items():
            for i, (ref, label) in enumerate(zip(items.refs, items.labels)):
                path = ref
                if base is not None:
                    try:
                        path = os.path.relpath(ref, base)
                    except ValueError:  # another drive on Windows
                        path = ref
                row: Tuple[str, ...] = (path, self.class_names[int(label)], split)
                if with_groups:
                    row += (items.groups[i] if items.groups is not None else "",)
                rows.append(row)
        return rows

    def sha256(self) -> str:
        """Digest of class names and (reference, label, split[, group]) rows, location-independent.

        Groups enter only when there are some, so a manifest without groups
        keeps the digest that feature files and resume fingerprints recorded.
        """
        digest = hashlib.sha256("\n".join(self.class_names).encode("utf-8"))
        for split, items in self.splits.items():
            digest.update(split.encode())
            digest.update(items.labels.tobytes())
            digest.update("\n".join(os.path.basename(ref) for ref in items.refs).encode("utf-8"))
        if self.has_groups:
            digest.update(b"\0groups")
            for items in self.splits.values():
                # length-prefixed, so the digest cannot confuse one group name with two
                for group in items.groups if items.groups is not None else [""] * len(items):
                    encoded = group.encode("utf-8")
                    digest.update(len(encoded).to_bytes(8, "little") + encoded)
        return digest.hexdigest()


# --------------------------------------------------------------------------- writing


def save_manifest(manifest: Manifest, path: PathLike, *, staged: bool = False) -> Path:
    """Write ``path,label,split`` CSV (``path,label,split,group`` when the images
    have groups; paths relative to the CSV's folder), atomically.

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
            writer.writerow(manifest.columns())
            writer.writerows(manifest.rows(relative_to=relative_to))
    except BaseException:
        target.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- reading


def read_manifest(path: PathLike) -> Manifest:
    """Read a manifest CSV as it stands: ``path,label[,split[,group]]`` rows, or
    any order of those columns under a header naming them (``path,...``);
    without a header, ``path,label[,split]`` or ``path,label,split,group``.
    Rows without a split form the split ``all``; with a group column every row
    needs a group. Relative paths are relative to the CSV."""
    path = Path(path)
    rows = _read_manifest_rows(path)
    splits_present = {split for _, _, split, _ in rows}
    if "all" in splits_present and len(splits_present) > 1:
        raise DataError(f"{path}: some rows name a split and some do not; give every row a split or none")
    class_names = sorted({label for _, label, _, _ in rows}, key=natural_key)
    index = {name: i for i, name in enumerate(class_names)}
    with_groups = rows[0][3] is not None
    splits = {}
    for split in [s for s in SPLIT_NAMES + ("all",) if s in splits_present]:
        chosen = [(ref, index[label], group) for ref, label, s, group in rows if s == split]
        splits[split] = SplitItems(
            [ref for ref, _, _ in chosen],
            [label for _, label, _ in chosen],
            [group for _, _, group in chosen] if with_groups else None,
        )
    return Manifest(class_names, splits, {"source": "manifest", "data": str(path)})


ManifestRow = Tuple[str, str, str, Optional[str]]


def _read_manifest_rows(path: Path) -> List[ManifestRow]:
    """(absolute reference, label, split or ``all``, group or None) of every data line."""
    if not path.is_file():
        raise DataError(f"{path}: no such manifest file")
    base = path.parent.resolve()
    header = manifest_header(path)
    positional_columns = MANIFEST_COLUMNS + (GROUP_COLUMN,)
    lines = list(manifest_lines(path))
    if header is not None and _names_columns(header) and tuple(header) != positional_columns[: len(header)]:
        # a header naming the columns in another order (e.g. path,label,group): read by name
        columns = {name: i for i, name in enumerate(header)}
        with_groups, width, expected = GROUP_COLUMN in columns, len(columns), ",".join(header)
    else:  # path,label[,split[,group]] by position, as manifests have always been read
        columns = {name: i for i, name in enumerate(positional_columns)}
        with_groups = (header is not None and header[3:4] == [GROUP_COLUMN]) or any(
            len(row) >= 4 and row[3].strip() for _, row in lines
        )
        width, expected = 4, "path,label[,split] (or path,label,split,group)"
    rows = [
        _parse_row(path, line_number, row, base, columns, width=width, expected=expected, with_groups=with_groups)
        for line_number, row in lines
    ]
    if not rows:
        raise DataError(f"{path}: manifest holds no rows; expected path,label[,split[,group]] lines")
    return rows


def _names_columns(header: List[str]) -> bool:
    """True for a header that names known columns, path and label among them, each once."""
    known = set(MANIFEST_COLUMNS + (GROUP_COLUMN,))
    return set(header) <= known and len(set(header)) == len(header) and {"path", "label"} <= set(header)


def _parse_row(
    path: Path, line_number: int, row: List[str], base: Path, columns: Dict[str, int],
    *, width: int, expected: str, with_groups: bool,
) -> ManifestRow:
    if not 2 <= len(row) <= width:
        raise DataError(f"{path}: line {line_number} has {len(row)} fields; expected {expected}")

    def value(name: str) -> str:
        position = columns.get(name)
        return row[position].strip() if position is not None and position < len(row) else ""

    ref, label, split = value("path"), value("label"), value("split") or "all"
    if not ref or not label:
        raise DataError(f"{path}: line {line_number} has an empty path or label")
    if split not in SPLIT_NAMES + ("all",):
        raise DataError(
            f"{path}: line {line_number} has split {split!r}; expected one of {', '.join(SPLIT_NAMES)}"
        )
    group = value(GROUP_COLUMN) if with_groups else None
    if with_groups and not group:
        raise DataError(
            f"{path}: line {line_number} has no group; a manifest with a group column needs one on every row"
        )
    return resolve_ref(ref, base), label, split, group


def manifest_header(path: Path) -> Optional[List[str]]:
    """The lower-cased fields of a ``path,...`` header on the first line, else None."""
    with open(path, newline="", encoding="utf-8") as handle:
        first = next(csv.reader(handle), None)
    if first and first[0].strip().lower() == "path":
        return [name.strip().lower() for name in first]
    return None


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
