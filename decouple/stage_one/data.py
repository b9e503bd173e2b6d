"""Data sources, long-tailed splits and the manifest that records them.

A source (a registry: ``image_folder``, ``split_folders``, ``manifest``,
``cifar``) lists image references and class names. :func:`build_manifest`
turns them into train / val / test (/ test_lt) splits:

- ``imbalance=IF`` subsamples the balanced training pool on the exponential
  profile of Cao et al., "Learning Imbalanced Datasets with Label-Distribution-
  Aware Margin Loss" (NeurIPS 2019), n_i = floor(n_max * (1/IF)^(i/(C-1))),
  class i in class-name order. The images the profile leaves over form a
  balanced val set of ``val_per_class`` per class; ``n_max`` defaults to the
  largest value that leaves them, so val costs training nothing else. The
  test set stays balanced and ``test_lt`` is the test set subsampled on the
  same profile.
- without ``imbalance`` (naturally long-tailed data) val is a stratified
  ``val_fraction`` of each class, at least ``min_val_per_class``, and each
  class keeps at least one training image.
- a source without a test split gives up a stratified ``test_fraction`` first.

The result is a :class:`Manifest` (class names, per-split references and
labels) saved as CSV ``path,label,split`` beside the features, and readable
again as a source. References are file paths, or ``FILE#INDEX`` for an image
inside a CIFAR python pickle.
"""

from __future__ import annotations

import concurrent.futures
import csv
import functools
import hashlib
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from decouple.atomic import atomic_path, temporary_sibling
from decouple.errors import ConfigError, DataError
from decouple.stage_one.profiles import exponential_counts
from decouple.registry import Registry

PathLike = Union[str, "os.PathLike[str]"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SPLIT_NAMES = ("train", "val", "test", "test_lt")
MANIFEST_COLUMNS = ("path", "label", "split")

SOURCES = Registry("data source")
register_source = SOURCES.register


# --------------------------------------------------------------------------- containers


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
class SourceData:
    """What a source found: class names and one or more splits (``all`` when unsplit)."""

    class_names: List[str]
    splits: Dict[str, SplitItems]
    location: str


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


# --------------------------------------------------------------------------- manifest I/O


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


def read_manifest(path: PathLike) -> Manifest:
    """Read a manifest CSV (``path,label[,split]``, header optional) as it stands."""
    source = load_manifest_source(path)
    return Manifest(source.class_names, source.splits, {"source": "manifest", "data": str(path)})


def _natural_key(name: str) -> Tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


@register_source("manifest")
def load_manifest_source(path: PathLike) -> SourceData:
    """A CSV of ``path,label[,split]`` rows; relative paths are relative to the CSV."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such manifest file")
    base = path.parent.resolve()
    rows: List[Tuple[str, str, str]] = []
    with open(path, newline="", encoding="utf-8") as handle:
        for line_number, row in enumerate(csv.reader(handle), start=1):
            if not row or not "".join(row).strip() or row[0].startswith("#"):
                continue
            if line_number == 1 and row[0].strip().lower() == "path":
                continue
            if len(row) not in (2, 3):
                raise DataError(
                    f"{path}: line {line_number} has {len(row)} fields; expected path,label[,split]"
                )
            ref, label = row[0].strip(), row[1].strip()
            split = row[2].strip() if len(row) == 3 and row[2].strip() else "all"
            if not ref or not label:
                raise DataError(f"{path}: line {line_number} has an empty path or label")
            if split not in SPLIT_NAMES + ("all",):
                raise DataError(
                    f"{path}: line {line_number} has split {split!r}; expected one of {', '.join(SPLIT_NAMES)}"
                )
            file_part = ref.split("#", 1)[0] if _is_pickle_ref(ref) else ref
            if not os.path.isabs(file_part):
                ref = str(base / ref)
            rows.append((ref, label, split))
    if not rows:
        raise DataError(f"{path}: manifest holds no rows; expected path,label[,split] lines")
    splits_present = {split for _, _, split in rows}
    if "all" in splits_present and len(splits_present) > 1:
        raise DataError(f"{path}: some rows name a split and some do not; give every row a split or none")
    class_names = sorted({label for _, label, _ in rows}, key=_natural_key)
    index = {name: i for i, name in enumerate(class_names)}
    splits = {}
    for split in [s for s in SPLIT_NAMES + ("all",) if s in splits_present]:
        chosen = [(ref, index[label]) for ref, label, s in rows if s == split]
        splits[split] = SplitItems([ref for ref, _ in chosen], [label for _, label in chosen])
    return SourceData(class_names, splits, str(path))


# --------------------------------------------------------------------------- folder sources


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _class_dirs(root: Path) -> List[Path]:
    return sorted(
        (entry for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")),
        key=lambda entry: _natural_key(entry.name),
    )


def _scan_class_folders(root: Path) -> Dict[str, List[str]]:
    classes = _class_dirs(root)
    found = {}
    for folder in classes:
        images = sorted(
            str(Path(dirpath) / name)
            for dirpath, _, names in os.walk(folder, followlinks=True)
            for name in names
            if _is_image(name)
        )
        if not images:
            raise DataError(
                f"{folder}: class folder {folder.name!r} holds no images; "
                f"expected files ending in {', '.join(IMAGE_EXTENSIONS[:5])}, ..."
            )
        found[folder.name] = images
    return found


@register_source("image_folder")
def load_image_folder(path: PathLike) -> SourceData:
    """``ROOT/<class>/*.jpg|png|...``: one folder per class (nested folders allowed)."""
    root = Path(path)
    found = _scan_class_folders(root)
    if not found:
        raise DataError(f"{root}: no class folders; expected ROOT/<class>/<image> files")
    class_names = list(found)
    refs, labels = [], []
    for label, name in enumerate(class_names):
        refs += found[name]
        labels += [label] * len(found[name])
    return SourceData(class_names, {"all": SplitItems(refs, labels)}, str(root))


@register_source("split_folders")
def load_split_folders(path: PathLike) -> SourceData:
    """``ROOT/train|val|test/<class>/...``: already split; classes from train."""
    root = Path(path)
    per_split = {
        split: _scan_class_folders(root / split)
        for split in ("train", "val", "test")
        if (root / split).is_dir()
    }
    if "train" not in per_split or not per_split["train"]:
        raise DataError(f"{root}/train: no class folders; expected ROOT/train/<class>/<image> files")
    class_names = list(per_split["train"])
    index = {name: i for i, name in enumerate(class_names)}
    splits = {}
    for split, found in per_split.items():
        unknown = sorted(set(found) - set(index))
        if unknown:
            raise DataError(
                f"{root / split / unknown[0]}: class {unknown[0]!r} has no folder under {root / 'train'}; "
                f"every class needs training images"
            )
        refs, labels = [], []
        for name, images in found.items():
            refs += images
            labels += [index[name]] * len(images)
        splits[split] = SplitItems(refs, labels)
    return SourceData(class_names, splits, str(root))


# --------------------------------------------------------------------------- CIFAR pickles


_CIFAR_LAYOUTS = {
    # meta file, label-names key, labels key, train files, test files
    "cifar10": ("batches.meta", "label_names", "labels", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
    "cifar100": ("meta", "fine_label_names", "fine_labels", ["train"], ["test"]),
}


def _cifar_layout(root: Path) -> Optional[str]:
    for name, (meta, _, _, train_files, test_files) in _CIFAR_LAYOUTS.items():
        if all((root / f).is_file() for f in [meta] + train_files + test_files):
            return name
    return None


def _is_pickle_ref(ref: str) -> bool:
    return bool(re.search(r"#\d+$", ref))


@functools.lru_cache(maxsize=8)
def _unpickle(path: str) -> Dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            raw = pickle.load(handle, encoding="bytes")
    except Exception as exc:
        raise DataError(f"{path}: cannot be read as a CIFAR python pickle ({type(exc).__name__})") from None
    return {key.decode() if isinstance(key, bytes) else key: value for key, value in raw.items()}


@register_source("cifar")
def load_cifar_pickles(path: PathLike) -> SourceData:
    """The CIFAR-10/100 "python version" folders (``cifar-10-batches-py``, ``cifar-100-python``)."""
    root = Path(path)
    layout = _cifar_layout(root)
    if layout is None:
        raise DataError(
            f"{root}: not a CIFAR python folder; expected data_batch_1..5 + test_batch + batches.meta "
            f"(CIFAR-10) or train + test + meta (CIFAR-100)"
        )
    meta_file, names_key, labels_key, train_files, test_files = _CIFAR_LAYOUTS[layout]
    class_names = [
        name.decode() if isinstance(name, bytes) else str(name)
        for name in _unpickle(str(root / meta_file))[names_key]
    ]
    splits = {}
    for split, files in (("train", train_files), ("test", test_files)):
        refs, labels = [], []
        for file_name in files:
            batch = _unpickle(str(root / file_name))
            batch_labels = batch.get(labels_key)
            if batch_labels is None or "data" not in batch:
                raise DataError(f"{root / file_name}: CIFAR batch lacks 'data' or {labels_key!r}")
            refs += [f"{root / file_name}#{i}" for i in range(len(batch_labels))]
            labels += list(batch_labels)
        splits[split] = SplitItems(refs, labels)
    return SourceData(class_names, splits, str(root))


# --------------------------------------------------------------------------- detection and images


def detect_source(path: PathLike) -> str:
    """Which registered source reads ``path``."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"--data {path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() in (".csv", ".txt"):
            return "manifest"
        raise DataError(f"--data {path}: a file must be a CSV manifest (path,label[,split])")
    if _cifar_layout(path):
        return "cifar"
    if (path / "train").is_dir() and _class_dirs(path / "train"):
        return "split_folders"
    return "image_folder"


def load_source(path: PathLike, *, source: str = "auto") -> SourceData:
    """Read ``path`` with the named source (``auto`` detects it)."""
    name = detect_source(path) if source == "auto" else SOURCES.check(source, where="--source")
    data = SOURCES.get(name)(path)
    if len(data.class_names) < 2:
        found = f"a single class {data.class_names[0]!r}" if data.class_names else "no class"
        raise DataError(f"--data {path}: found {found}; recognition needs at least two classes")
    return data


def load_image(ref: str):
    """A PIL RGB image from a file path or a ``PICKLE#INDEX`` reference."""
    from PIL import Image

    if _is_pickle_ref(ref) and not os.path.exists(ref):
        file_part, index = ref.rsplit("#", 1)
        data = _unpickle(file_part)["data"]
        row = np.asarray(data[int(index)], dtype=np.uint8)
        return Image.fromarray(row.reshape(3, 32, 32).transpose(1, 2, 0))
    with Image.open(ref) as image:
        return image.convert("RGB")


def image_problem(ref: str) -> Optional[str]:
    """None if ``ref`` decodes, else a short reason. Large JPEGs decode at reduced scale."""
    from PIL import Image

    if _is_pickle_ref(ref) and not os.path.exists(ref):
        try:
            load_image(ref)
            return None
        except Exception as exc:
            return type(exc).__name__
    try:
        with Image.open(ref) as image:
            image.draft("RGB", (64, 64))
            image.load()
        return None
    except Exception as exc:
        return (str(exc).splitlines() or [type(exc).__name__])[0][:80] or type(exc).__name__


def find_bad_images(refs: Sequence[str], *, workers: int = 4) -> Dict[str, str]:
    """ref -> reason for every reference that does not decode."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        problems = list(pool.map(image_problem, refs, chunksize=256))
    return {ref: problem for ref, problem in zip(refs, problems) if problem}


def native_image_size(refs: Sequence[str], *, sample: int = 16) -> int:
    """Median longer side of up to ``sample`` evenly spaced images."""
    from PIL import Image

    picks = [refs[i] for i in np.linspace(0, len(refs) - 1, min(sample, len(refs))).astype(int)]
    sides = []
    for ref in picks:
        if _is_pickle_ref(ref) and not os.path.exists(ref):
            sides.append(32)
            continue
        try:
            with Image.open(ref) as image:
                sides.append(max(image.size))
        except Exception:
            continue
    return int(np.median(sides)) if sides else 224


# --------------------------------------------------------------------------- splitting


def _rng(seed: int, *purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed, *purpose])


def _per_class(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> List[np.ndarray]:
    """Indices of each class, in a seeded random order."""
    return [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]


def stratified_carve(
    labels: np.ndarray, num_classes: int, *, fraction: float, minimum: int, seed: int, purpose: int = 0
) -> Tuple[np.ndarray, np.ndarray]:
    """Split indices into (kept, carved): per class max(minimum, round(fraction * n)),
    but never a class's last image."""
    if not 0 <= fraction < 1:
        raise ConfigError(f"split fraction must lie in [0, 1); got {fraction}")
    kept, carved = [], []
    for indices in _per_class(labels, num_classes, _rng(seed, purpose)):
        take = min(max(minimum, int(round(fraction * len(indices)))), max(len(indices) - 1, 0))
        carved.append(indices[:take])
        kept.append(indices[take:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(carved))


def long_tail_counts(
    pool_counts: np.ndarray, imbalance: float, *, n_max: Optional[int] = None, reserve: int = 0
) -> np.ndarray:
    """Training counts (C,) on the exponential profile (Cao et al. 2019).

    ``n_max`` defaults to the largest value for which every class i still has
    ``reserve`` images beyond n_i. Raises DataError naming the first class
    whose pool is too small.
    """
    pool_counts = np.asarray(pool_counts, dtype=np.int64)
    num_classes = len(pool_counts)
    if imbalance < 1:
        raise ConfigError(f"--imbalance must be >= 1; got {imbalance}")
    if n_max is None:
        ratios = (1.0 / imbalance) ** (np.arange(num_classes) / max(num_classes - 1, 1))
        n_max = int(np.floor(np.min((pool_counts - reserve) / ratios) + 1e-9))
        if n_max < 1:
            short = int(np.argmin(pool_counts))
            raise DataError(
                f"class {short} has {pool_counts[short]} images; the profile needs at least "
                f"{reserve + 1} ({reserve} for val)"
            )
    counts = exponential_counts(int(n_max), num_classes, imbalance)
    needed = counts + reserve
    short = np.flatnonzero(needed > pool_counts)
    if len(short):
        c = int(short[0])
        raise DataError(
            f"class {c} has {pool_counts[c]} images; the profile (n_max={n_max}, imbalance {imbalance:g}) "
            f"asks {counts[c]}" + (f" plus {reserve} for val" if reserve else "")
        )
    return counts


def build_manifest(
    data: SourceData,
    *,
    imbalance: Optional[float] = None,
    n_max: Optional[int] = None,
    val_per_class: int = 20,
    val_fraction: float = 0.1,
    min_val_per_class: int = 1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Manifest:
    """Train / val / test (/ test_lt) splits of a source, seeded (see the module docstring)."""
    names = data.class_names
    num_classes = len(names)
    splits = dict(data.splits)
    info: Dict[str, Any] = {"source_location": data.location, "seed": seed, "imbalance": imbalance}
    if "all" in splits:
        pool = splits.pop("all")
        kept, carved = stratified_carve(
            pool.labels, num_classes, fraction=test_fraction, minimum=1, seed=seed, purpose=1
        )
        splits["train"], splits["test"] = pool.subset(kept), pool.subset(carved)
        info["test_carved"] = {"fraction": test_fraction}
    if "train" not in splits:
        raise DataError(f"{data.location}: no training split; expected train rows or an unsplit folder")
    train = splits["train"]
    pool_counts = np.bincount(train.labels, minlength=num_classes)
    for split_name, items in splits.items():
        counts = np.bincount(items.labels, minlength=num_classes)
        if split_name == "train" and (counts == 0).any():
            empty = int(np.flatnonzero(counts == 0)[0])
            raise DataError(f"{data.location}: class {names[empty]!r} has no training images")
    has_val = "val" in splits
    if imbalance is not None:
        reserve = 0 if has_val else val_per_class
        try:
            train_counts = long_tail_counts(pool_counts, imbalance, n_max=n_max, reserve=reserve)
        except DataError as exc:
            match = re.match(r"class (\d+) (.*)", str(exc))
            text = f"class {names[int(match.group(1))]!r} {match.group(2)}" if match else str(exc)
            raise DataError(
                f"{data.location}: {text}; lower --n-max, --imbalance or --val-per-class"
            ) from None
        order = _per_class(train.labels, num_classes, _rng(seed, 2))
        chosen = np.sort(np.concatenate([idx[:n] for idx, n in zip(order, train_counts)]))
        if not has_val and val_per_class > 0:
            leftover = np.sort(
                np.concatenate([idx[n : n + val_per_class] for idx, n in zip(order, train_counts)])
            )
            splits["val"] = train.subset(leftover)
        splits["train"] = train.subset(chosen)
        info["profile"] = {
            "kind": "exponential",
            "n_max": int(train_counts[0]),
            "imbalance": imbalance,
            "val_per_class": 0 if has_val else val_per_class,
        }
        if "test" in splits and "test_lt" not in splits:
            test = splits["test"]
            test_counts = np.bincount(test.labels, minlength=num_classes)
            lt_counts = exponential_counts(int(test_counts.min()), num_classes, imbalance)
            test_order = _per_class(test.labels, num_classes, _rng(seed, 3))
            picked = np.sort(np.concatenate([idx[:n] for idx, n in zip(test_order, lt_counts)]))
            splits["test_lt"] = test.subset(picked)
    elif not has_val:
        kept, carved = stratified_carve(
            train.labels, num_classes, fraction=val_fraction, minimum=min_val_per_class, seed=seed, purpose=4
        )
        splits["train"], splits["val"] = train.subset(kept), train.subset(carved)
        info["val_carved"] = {"fraction": val_fraction, "min_per_class": min_val_per_class}
    ordered = {name: splits[name] for name in SPLIT_NAMES if name in splits and len(splits[name])}
    return Manifest(list(names), ordered, info)


def drop_bad_images(manifest: Manifest, *, strict: bool = False, workers: int = 4) -> Manifest:
    """Check every image decodes; drop and list the bad ones, or raise with ``strict``."""
    refs = sorted({ref for items in manifest.splits.values() for ref in items.refs})
    bad = find_bad_images(refs, workers=workers)
    if not bad:
        manifest.info["skipped_images"] = []
        return manifest
    first = sorted(bad)[0]
    if strict:
        raise DataError(
            f"{first}: cannot be decoded ({bad[first]}); {len(bad)} bad image(s) in all, "
            f"fatal under --strict"
        )
    splits = {}
    for name, items in manifest.splits.items():
        keep = [i for i, ref in enumerate(items.refs) if ref not in bad]
        splits[name] = items.subset(keep)
    counts = np.bincount(splits["train"].labels, minlength=manifest.num_classes)
    if (counts == 0).any():
        empty = int(np.flatnonzero(counts == 0)[0])
        raise DataError(
            f"class {manifest.class_names[empty]!r} has no readable training image once "
            f"{len(bad)} bad image(s) are skipped (first: {first})"
        )
    info = dict(manifest.info, skipped_images=sorted(bad))
    return Manifest(manifest.class_names, {k: v for k, v in splits.items() if len(v)}, info)


def prepare_manifest(
    path: PathLike,
    *,
    source: str = "auto",
    imbalance: Optional[float] = None,
    n_max: Optional[int] = None,
    val_per_class: int = 20,
    val_fraction: float = 0.1,
    min_val_per_class: int = 1,
    test_fraction: float = 0.2,
    seed: int = 0,
    check_images: bool = True,
    strict: bool = False,
    workers: int = 4,
) -> Manifest:
    """Load a source, build its splits and (optionally) check every image decodes."""
    data = load_source(path, source=source)
    manifest = build_manifest(
        data,
        imbalance=imbalance,
        n_max=n_max,
        val_per_class=val_per_class,
        val_fraction=val_fraction,
        min_val_per_class=min_val_per_class,
        test_fraction=test_fraction,
        seed=seed,
    )
    manifest.info["data"] = str(path)
    if check_images:
        manifest = drop_bad_images(manifest, strict=strict, workers=workers)
    return manifest


# --------------------------------------------------------------------------- torch dataset


class ImageDataset:
    """A map-style dataset over one split: (transform(image), label)."""

    def __init__(self, items: SplitItems, transform: Optional[Callable] = None) -> None:
        self.refs = items.refs
        self.labels = items.labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int):
        ref = self.refs[index]
        try:
            image = load_image(ref)
        except Exception as exc:
            raise DataError(f"{ref}: cannot be decoded ({type(exc).__name__}: {exc})") from None
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])
