"""The feature cache: decouple-features v1 HDF5 files (the only code that touches h5py).

Layout (DESIGN.md)::

    attrs on /:  format = "decouple-features", version = 1,
                 backbone (str), class_names (array of str, length C)
    /<split>/features   float16 or float32, (N, D)
    /<split>/labels     integer, (N,), values in [0, C)
    /train/views        optional, (N, K, D): K augmented embeddings of each
                        training image (``decouple extract --views K``)
    /train/reference_counts  optional, int64 (C,): the training counts of the
                        long-tailed profile the run belongs to (attribute
                        ``source``, one line naming it); the many / medium /
                        few groups come from them when present
    /classifier/weight  optional, float32 (C, D), and /classifier/bias (C,):
                        the fine-tuned network's own linear classifier on
                        these embeddings (:class:`Classifier`)

Readers load features and labels and ignore any other dataset of a split.
Reading validates everything at the boundary and raises
:class:`~decouple.errors.FeatureFileError` with one line naming the file,
the field and the expectation. Writing goes to a temporary file beside the
target that is renamed at the end, so a crash never leaves half a file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import h5py
import numpy as np

from decouple.atomic import commit, temporary_sibling
from decouple.errors import FeatureFileError
from decouple.metrics import shot_groups

FORMAT = "decouple-features"
VERSION = 1
SPLIT_ORDER = ("train", "val", "test")
#: Top-level groups that are not splits: the network's own classifier.
NOT_SPLITS = ("classifier",)
PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class Split:
    """Features (N, D) and integer labels (N,) of one split, and the images'
    fingerprints (N, 2) uint64 where the file has them (``decouple extract``
    writes /<split>/fingerprints: each image's perceptual hash and its
    mirror's, :func:`decouple.stage_one.images.image_fingerprints`)."""

    features: np.ndarray
    labels: np.ndarray
    fingerprints: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Classifier:
    """The fine-tuned network's own classifier, /classifier of a feature file:
    logits = features @ weight.T + bias, ``weight`` (C, D) and ``bias`` (C,)
    float32. ``decouple extract`` writes it when the network's classifier is
    an ``nn.Linear`` on the embedding it stores. ``loss`` and ``sampler``:
    the stage-one loss and sampler it was trained with (``sampler_params``,
    ``epochs`` as run); ``trained`` is False for a frozen run (epochs 0)."""

    weight: np.ndarray
    bias: np.ndarray
    loss: str
    sampler: str
    trained: bool
    sampler_params: Dict[str, Any] = field(default_factory=dict)
    epochs: int = 0


@dataclass
class FeatureSet:
    """A feature file in memory: class names, splits in order, extra attributes."""

    class_names: List[str]
    splits: Dict[str, Split]
    backbone: str = "unknown"
    attrs: Dict[str, Any] = field(default_factory=dict)
    path: Optional[str] = None
    reference_counts: Optional[np.ndarray] = None
    reference_source: Optional[str] = None
    #: The fine-tuned network's own classifier, where the file has one.
    classifier: Optional[Classifier] = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def dim(self) -> int:
        return int(self.splits["train"].features.shape[1])

    @property
    def train_counts(self) -> np.ndarray:
        """Training images per class (C,)."""
        return np.bincount(self.splits["train"].labels, minlength=self.num_classes)

    @property
    def group_counts(self) -> np.ndarray:
        """The counts (C,) the many / medium / few groups come from: the reference
        profile's where the file has them, else the training counts (losses and
        samplers always use :attr:`train_counts`)."""
        return self.train_counts if self.reference_counts is None else self.reference_counts

    @property
    def eval_splits(self) -> List[str]:
        """Every split other than train, in file order."""
        return [name for name in self.splits if name != "train"]


def _ordered(names: Iterable[str]) -> List[str]:
    """The split names among ``names`` (top-level groups), in split order."""
    names = [name for name in names if name not in NOT_SPLITS]
    head = [name for name in SPLIT_ORDER if name in names]
    return head + sorted(name for name in names if name not in SPLIT_ORDER)


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.dtype.kind in ("S", "O"):
        return [_decode(item) for item in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _open_for_reading(path: Path):
    if not path.exists():
        raise FeatureFileError(f"{path}: no such feature file")
    if path.is_dir():
        raise FeatureFileError(f"{path}: is a folder; expected a decouple-features HDF5 file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        truncated = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", str(exc))
        if truncated:
            raise FeatureFileError(
                f"{path}: HDF5 file is truncated ({truncated.group(1)} of {truncated.group(2)} bytes); "
                f"expected a complete decouple-features v1 file"
            ) from None
        reason = str(exc).split("(")[0].strip().rstrip(",") or "unreadable"
        raise FeatureFileError(
            f"{path}: cannot be read as HDF5 ({reason}); expected a decouple-features v1 file"
        ) from None


def _check_finite(path: Path, name: str, features: np.ndarray) -> None:
    chunk = 65536
    for start in range(0, len(features), chunk):
        block = features[start : start + chunk]
        if not np.isfinite(block).all():
            bad = start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
            raise FeatureFileError(
                f"{path}: /{name}/features must be finite; row {bad} holds NaN or inf"
            )


def read_features(
    path: PathLike,
    *,
    splits: Optional[Sequence[str]] = None,
    dtype: Any = np.float32,
) -> FeatureSet:
    """Read and validate a feature file; features are cast to ``dtype``.

    ``splits`` limits which splits are loaded (train is always loaded).
    """
    path = Path(path)
    with _open_for_reading(path) as handle:
        attrs, class_names = _read_header(path, handle)
        num_classes = len(class_names)
        backbone = str(attrs.pop("backbone", "unknown"))
        wanted = _ordered(handle)
        if splits is not None:
            missing = [name for name in splits if name not in wanted]
            if missing:
                raise FeatureFileError(
                    f"{path}: no /{missing[0]} split; the file holds {', '.join(wanted)}"
                )
            wanted = _ordered(set(splits) | {"train"})
        loaded: Dict[str, Split] = {}
        dim = None
        for name in wanted:
            loaded[name] = _read_split(path, handle, name, num_classes)
            split_dim = loaded[name].features.shape[1]
            if dim is None:
                dim = split_dim
            elif split_dim != dim:
                raise FeatureFileError(
                    f"{path}: /{name}/features must have D = {dim} columns like /train; got {split_dim}"
                )
            loaded[name].features = loaded[name].features.astype(dtype, copy=False)
        reference = _read_reference_counts(path, handle, num_classes)
        classifier = _read_classifier(path, handle, num_classes, dim)
    _check_every_class_trains(path, loaded["train"].labels, class_names)
    return FeatureSet(class_names=class_names, splits=loaded, backbone=backbone, attrs=attrs, path=str(path),
                      reference_counts=None if reference is None else reference[0],
                      reference_source=None if reference is None else reference[1], classifier=classifier)


def read_classifier(path: PathLike) -> Optional[Classifier]:
    """The fine-tuned network's own classifier of a feature file (/classifier,
    checked against the file's classes and /train/features), or None where
    the file has none."""
    path = Path(path)
    with _open_for_reading(path) as handle:
        _, class_names = _read_header(path, handle)
        train = _split_group(path, handle, "train", ("features",))
        return _read_classifier(path, handle, len(class_names), int(train["features"].shape[-1]))


def _read_classifier(path: Path, handle: Any, num_classes: int, dim: int) -> Optional[Classifier]:
    """/classifier as a :class:`Classifier`, or None where the file has none."""
    if "classifier" not in handle:
        return None
    group = handle["classifier"]
    arrays = {}
    for name, shape in (("weight", (num_classes, dim)), ("bias", (num_classes,))):
        dataset = group.get(name) if isinstance(group, h5py.Group) else None
        if not isinstance(dataset, h5py.Dataset) or dataset.shape != shape or dataset.dtype.kind != "f":
            got = "missing" if not isinstance(dataset, h5py.Dataset) else f"{dataset.dtype} {dataset.shape}"
            raise FeatureFileError(f"{path}: /classifier/{name} must be float {shape} (C classes, D columns of "
                                   f"/train/features); got {got}")
        arrays[name] = dataset[()].astype(np.float32)
        if not np.isfinite(arrays[name]).all():
            raise FeatureFileError(f"{path}: /classifier/{name} must be finite; it holds NaN or inf")
    attrs = {key: _decode(group.attrs[key]) for key in group.attrs}
    for key in ("loss", "sampler"):
        if not isinstance(attrs.get(key), str) or not attrs[key]:
            raise FeatureFileError(f"{path}: /classifier attribute {key} must name the stage-one {key}; "
                                   f"got {attrs.get(key)!r}")
    try:
        sampler_params = json.loads(attrs.get("sampler_params") or "{}")
    except ValueError:
        sampler_params = None
    if not isinstance(sampler_params, dict):
        raise FeatureFileError(f"{path}: /classifier attribute sampler_params must be a JSON object")
    return Classifier(weight=arrays["weight"], bias=arrays["bias"], loss=attrs["loss"], sampler=attrs["sampler"],
                      trained=bool(attrs.get("trained", True)), sampler_params=sampler_params,
                      epochs=int(attrs.get("epochs", 0)))


def _read_header(path: Path, handle: Any) -> Tuple[Dict[str, Any], List[str]]:
    """(attributes of / without format, version and class_names; class names),
    after checking the format, the version and the class names."""
    try:
        attrs = {key: _decode(handle.attrs[key]) for key in handle.attrs}
    except OSError as exc:
        raise FeatureFileError(f"{path}: attributes of / cannot be read ({exc})") from None
    if attrs.get("format") != FORMAT:
        raise FeatureFileError(f"{path}: attribute format must be {FORMAT!r}; got {attrs.get('format')!r}")
    if attrs.get("version") != VERSION:
        raise FeatureFileError(f"{path}: attribute version must be {VERSION}; got {attrs.get('version')!r}")
    class_names = attrs.pop("class_names", None)
    if class_names is None or isinstance(class_names, str) or len(class_names) == 0:
        raise FeatureFileError(f"{path}: attribute class_names must be a non-empty array of strings")
    attrs.pop("format")
    attrs.pop("version")
    if "train" not in handle:
        raise FeatureFileError(f"{path}: no /train group; expected /train/features and /train/labels")
    return attrs, [str(name) for name in class_names]


def _check_every_class_trains(path: Path, labels: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    """Training images per class (C,); a class without any is a FeatureFileError."""
    counts = np.bincount(labels, minlength=len(class_names))
    if (counts == 0).any():
        empty = int(np.flatnonzero(counts == 0)[0])
        raise FeatureFileError(
            f"{path}: /train/labels must hold every class at least once; "
            f"class {empty} ({class_names[empty]!r}) has no training sample"
        )
    return counts


def read_train_counts(path: PathLike) -> np.ndarray:
    """Training images per class (C,) of a feature file, reading only its
    header and /train/labels (checked as :func:`read_features` checks them)."""
    path = Path(path)
    with _open_for_reading(path) as handle:
        _, class_names = _read_header(path, handle)
        group = _split_group(path, handle, "train", ("labels",))
        labels_ds = group["labels"]
        _check_labels_dataset(path, "train", labels_ds)
        if labels_ds.shape[0] == 0:
            raise FeatureFileError(f"{path}: /train holds no samples; expected N > 0")
        try:
            labels = labels_ds[()].astype(np.int64)
        except OSError as exc:
            raise FeatureFileError(
                f"{path}: /train cannot be read ({str(exc).split('(')[0].strip()}); the file may be truncated"
            ) from None
    _check_label_range(path, "train", labels, len(class_names))
    return _check_every_class_trains(path, labels, class_names)


def read_attrs(path: PathLike) -> Dict[str, Any]:
    """The attributes of / of a feature file (backbone, train_profile, config,
    ...; without format, version and class_names), reading only its header."""
    path = Path(path)
    with _open_for_reading(path) as handle:
        attrs, _ = _read_header(path, handle)
    return attrs


def read_reference_counts(path: PathLike) -> Optional[np.ndarray]:
    """/train/reference_counts (C,) of a feature file, or None where it has none."""
    path = Path(path)
    with _open_for_reading(path) as handle:
        _, class_names = _read_header(path, handle)
        reference = _read_reference_counts(path, handle, len(class_names))
    return None if reference is None else reference[0]


def _read_reference_counts(path: Path, handle: Any, num_classes: int) -> Optional[Tuple[np.ndarray, str]]:
    """(counts (C,) int64, source) of /train/reference_counts, checked; None where absent."""
    group = handle["train"]
    if not isinstance(group, h5py.Group) or "reference_counts" not in group:
        return None
    dataset = group["reference_counts"]
    counts = dataset[()] if dataset.shape == (num_classes,) and dataset.dtype.kind in ("i", "u") else None
    if counts is None or (counts < 0).any():
        raise FeatureFileError(
            f"{path}: /train/reference_counts must be ({num_classes},) non-negative integers (the reference "
            f"profile's training counts); got shape {dataset.shape} {dataset.dtype}"
            + ("" if counts is None else f", min {counts.min()}")
        )
    return counts.astype(np.int64), str(_decode(dataset.attrs.get("source", "")))


def _split_group(path: Path, handle: Any, name: str, fields: Sequence[str]) -> Any:
    """The HDF5 group /``name``, checked to hold the datasets ``fields``."""
    group = handle[name]
    if not isinstance(group, h5py.Group):
        raise FeatureFileError(f"{path}: /{name} must be a group holding features and labels")
    for field_name in fields:
        if field_name not in group:
            raise FeatureFileError(f"{path}: /{name}/{field_name} is missing")
    return group


def _check_labels_dataset(path: Path, name: str, labels_ds: Any) -> None:
    """/``name``/labels must be a 1-D integer dataset."""
    if labels_ds.ndim != 1:
        raise FeatureFileError(f"{path}: /{name}/labels must be 1-D (N,); got shape {labels_ds.shape}")
    if labels_ds.dtype.kind not in ("i", "u"):
        raise FeatureFileError(f"{path}: /{name}/labels must be integers; got {labels_ds.dtype}")


def _check_label_range(path: Path, name: str, labels: np.ndarray, num_classes: int) -> None:
    """Every label of /``name`` must name one of the ``num_classes`` classes."""
    if labels.min() < 0 or labels.max() >= num_classes:
        raise FeatureFileError(
            f"{path}: /{name}/labels must lie in [0, {num_classes}); got min {labels.min()}, max {labels.max()}"
        )


def _read_split(path: Path, handle: Any, name: str, num_classes: int) -> Split:
    group = _split_group(path, handle, name, ("features", "labels"))
    features_ds, labels_ds = group["features"], group["labels"]
    if features_ds.ndim != 2 or features_ds.shape[1] == 0:
        raise FeatureFileError(
            f"{path}: /{name}/features must be 2-D (N, D) with D > 0; got shape {features_ds.shape}"
        )
    if features_ds.dtype.kind != "f":
        raise FeatureFileError(
            f"{path}: /{name}/features must be float16 or float32; got {features_ds.dtype}"
        )
    _check_labels_dataset(path, name, labels_ds)
    if features_ds.shape[0] != labels_ds.shape[0]:
        raise FeatureFileError(
            f"{path}: /{name}/features has {features_ds.shape[0]} rows but /{name}/labels has "
            f"{labels_ds.shape[0]}; they must be equal"
        )
    if features_ds.shape[0] == 0:
        raise FeatureFileError(f"{path}: /{name} holds no samples; expected N > 0")
    try:
        features = features_ds[()]
        labels = labels_ds[()].astype(np.int64)
    except OSError as exc:
        raise FeatureFileError(
            f"{path}: /{name} cannot be read ({str(exc).split('(')[0].strip()}); the file may be truncated"
        ) from None
    _check_label_range(path, name, labels, num_classes)
    _check_finite(path, name, features)
    return Split(features=features, labels=labels, fingerprints=_read_fingerprints(path, group, name, len(labels)))


def _read_fingerprints(path: Path, group: Any, name: str, n: int) -> Optional[np.ndarray]:
    """/name/fingerprints (n, 2) uint64, or None where the file has none."""
    if "fingerprints" not in group:
        return None
    dataset = group["fingerprints"]
    if dataset.shape != (n, 2) or dataset.dtype != np.uint64:
        raise FeatureFileError(
            f"{path}: /{name}/fingerprints must be ({n}, 2) uint64 (an image hash and its mirror's); "
            f"got {dataset.shape} {dataset.dtype}"
        )
    return dataset[()]


def _encode_attr(value: Any) -> Any:
    if isinstance(value, (dict, list, tuple)) and not (
        isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value)
    ):
        return json.dumps(value, sort_keys=True, default=str)
    return value


class FeatureWriter:
    """Write a v1 feature file atomically.

    ::

        with FeatureWriter(path, class_names=names, backbone="resnet32_cifar") as writer:
            writer.write_split("train", features, labels)          # whole arrays, or
            writer.create_split("test", n=10000, dim=64)           # streamed rows
            writer.write_rows("test", 0, block_features, block_labels)
            writer.create_views("train", n=50000, views=4, dim=64)  # optional
            writer.write_view_rows("train", 0, 0, block_features)

    Everything goes to ``<path>.tmp-<pid>``; leaving the block normally
    renames it to ``path``, an exception removes it.
    """

    def __init__(
        self,
        path: PathLike,
        *,
        class_names: Sequence[str],
        backbone: str,
        attrs: Optional[Dict[str, Any]] = None,
        dtype: Any = np.float16,
    ) -> None:
        self.path = Path(path)
        self.tmp_path = temporary_sibling(self.path)
        self.class_names = [str(name) for name in class_names]
        self.backbone = backbone
        self.attrs = dict(attrs or {})
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.float16), np.dtype(np.float32)):
            raise FeatureFileError(f"{self.path}: features dtype must be float16 or float32; got {self.dtype}")
        self._handle = None

    def __enter__(self) -> "FeatureWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = h5py.File(self.tmp_path, "w")
        handle = self._handle
        handle.attrs["format"] = FORMAT
        handle.attrs["version"] = VERSION
        handle.attrs["backbone"] = self.backbone
        handle.attrs.create("class_names", self.class_names, dtype=h5py.string_dtype())
        for key, value in self.attrs.items():
            handle.attrs[key] = _encode_attr(value)
        return self

    def create_split(self, name: str, *, n: int, dim: int) -> None:
        """Create empty /name/features (n, dim) and /name/labels (n,)."""
        group = self._handle.require_group(name)  # /train may already hold reference_counts
        group.create_dataset("features", shape=(n, dim), dtype=self.dtype)
        group.create_dataset("labels", shape=(n,), dtype=np.int64)

    def write_rows(self, name: str, start: int, features: np.ndarray, labels: np.ndarray) -> None:
        """Write rows [start, start + len(labels)) of a split made by create_split."""
        stop = start + len(labels)
        self._handle[name]["features"][start:stop] = np.asarray(features, dtype=self.dtype)
        self._handle[name]["labels"][start:stop] = np.asarray(labels, dtype=np.int64)

    def create_fingerprints(self, name: str, *, n: int) -> None:
        """Create empty /name/fingerprints (n, 2) uint64 in a split made by create_split."""
        self._handle[name].create_dataset("fingerprints", shape=(n, 2), dtype=np.uint64)

    def write_fingerprint_rows(self, name: str, start: int, fingerprints: np.ndarray) -> None:
        """Write rows [start, start + len(fingerprints)) of /name/fingerprints."""
        self._handle[name]["fingerprints"][start:start + len(fingerprints)] = np.asarray(fingerprints, np.uint64)

    def create_views(self, name: str, *, n: int, views: int, dim: int) -> None:
        """Create empty /name/views (n, views, dim) in a split made by create_split."""
        self._handle[name].create_dataset("views", shape=(n, views, dim), dtype=self.dtype)

    def write_view_rows(self, name: str, view: int, start: int, features: np.ndarray) -> None:
        """Write rows [start, start + len(features)) of view ``view`` of /name/views."""
        stop = start + len(features)
        self._handle[name]["views"][start:stop, view, :] = np.asarray(features, dtype=self.dtype)

    def write_reference_counts(self, counts: np.ndarray, *, source: str) -> None:
        """/train/reference_counts (C,) int64 with attribute ``source`` (one line naming the profile)."""
        counts = np.asarray(counts, dtype=np.int64)
        if counts.shape != (len(self.class_names),) or (counts < 0).any():
            raise FeatureFileError(
                f"{self.path}: /train/reference_counts must be ({len(self.class_names)},) non-negative integers; "
                f"got shape {counts.shape}"
            )
        dataset = self._handle.require_group("train").create_dataset("reference_counts", data=counts)
        dataset.attrs["source"] = source

    def write_classifier(self, classifier: Classifier) -> None:
        """Write /classifier/weight (C, D) and /classifier/bias (C,) float32 with
        the attributes loss, sampler, trained, sampler_params (JSON) and epochs."""
        group = self._handle.create_group("classifier")
        group.create_dataset("weight", data=np.asarray(classifier.weight, dtype=np.float32))
        group.create_dataset("bias", data=np.asarray(classifier.bias, dtype=np.float32))
        group.attrs["loss"] = classifier.loss
        group.attrs["sampler"] = classifier.sampler
        group.attrs["trained"] = bool(classifier.trained)
        group.attrs["sampler_params"] = json.dumps(classifier.sampler_params, sort_keys=True, default=str)
        group.attrs["epochs"] = int(classifier.epochs)

    def write_split(self, name: str, features: np.ndarray, labels: np.ndarray,
                    fingerprints: Optional[np.ndarray] = None) -> None:
        """Write a whole split at once (its image fingerprints too, if given)."""
        features = np.asarray(features)
        labels = np.asarray(labels)
        if features.ndim != 2 or len(features) != len(labels):
            raise FeatureFileError(
                f"{self.path}: /{name}: features must be (N, D) with N = len(labels); "
                f"got {features.shape} and {labels.shape}"
            )
        self.create_split(name, n=len(labels), dim=features.shape[1])
        self.write_rows(name, 0, features, labels)
        if fingerprints is not None:
            self.create_fingerprints(name, n=len(labels))
            self.write_fingerprint_rows(name, 0, fingerprints)

    def __exit__(self, exc_type, exc, tb) -> None:
        handle, self._handle = self._handle, None
        try:
            handle.close()
        except Exception:
            if exc_type is None:
                self._discard()
                raise
        if exc_type is not None:
            self._discard()
            return
        try:
            commit(self.tmp_path, self.path)
        except OSError:
            self._discard()
            raise

    def _discard(self) -> None:
        try:
            self.tmp_path.unlink()
        except FileNotFoundError:
            pass


def write_features(path: PathLike, feature_set: FeatureSet, *, dtype: Any = np.float32) -> Path:
    """Write a whole :class:`FeatureSet` atomically; returns the path."""
    with FeatureWriter(
        path,
        class_names=feature_set.class_names,
        backbone=feature_set.backbone,
        attrs=feature_set.attrs,
        dtype=dtype,
    ) as writer:
        for name in _ordered(feature_set.splits):
            split = feature_set.splits[name]
            writer.write_split(name, split.features, split.labels, split.fingerprints)
        if feature_set.reference_counts is not None:
            writer.write_reference_counts(feature_set.reference_counts, source=feature_set.reference_source or "")
        if feature_set.classifier is not None:
            writer.write_classifier(feature_set.classifier)
    return Path(path)


def summarize(
    feature_set: FeatureSet, *, many_threshold: int = 100, few_threshold: int = 20, groups: str = "thresholds"
) -> Dict[str, Any]:
    """What ``decouple info`` prints: per-split N and D, class count, training
    count statistics and the size of each shot group (by rule ``groups``,
    :func:`decouple.metrics.shot_groups`, on :attr:`FeatureSet.group_counts`),
    and the reference counts with their source where the file has them."""
    counts = feature_set.train_counts
    members = shot_groups(
        feature_set.group_counts, rule=groups, many_threshold=many_threshold, few_threshold=few_threshold
    )
    reference = feature_set.reference_counts
    return {
        "path": feature_set.path,
        "backbone": feature_set.backbone,
        "num_classes": feature_set.num_classes,
        "splits": {
            name: {"n": len(split), "dim": int(split.features.shape[1])}
            for name, split in feature_set.splits.items()
        },
        "train_counts": {
            "max": int(counts.max()),
            "min": int(counts.min()),
            "imbalance_factor": float(counts.max() / counts.min()),
        },
        "groups": {name: int(len(indices)) for name, indices in members.items()},
        "group_rule": groups,
        "group_counts": "train" if reference is None else "reference",
        "reference_counts": None if reference is None else {
            "source": feature_set.reference_source,
            "max": int(reference.max()),
            "min": int(reference.min()),
            "counts": [int(count) for count in reference],
        },
        "train_profile": feature_set.attrs.get("train_profile"),
    }
