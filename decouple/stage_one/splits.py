"""Long-tailed subsample and train / val / test (/ test_lt) splits of a source.

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
- ``train_profile="balanced"`` (which needs ``imbalance``: the reference
  long-tailed profile) gives the balanced sibling of the long-tailed run with
  the same seed, imbalance and n_max: the same val, test and test_lt, and a
  train of n_max images per class (all the class has left, when fewer) that
  holds the long-tailed train. Both record the profile's training counts as
  ``reference_counts``, from which both take their many / medium / few groups.

Groups (bursts, tracks, specimens; ``group_by``, a regular expression whose
first capture group, searched in each file name, names the image's group, or
a manifest's ``group`` column) make every carved split group-disjoint from
train, so near-duplicates of one object never sit on both sides:

- test and the stratified val are carved by whole groups, taken in a seeded
  order until each class reaches its usual count (so it may overshoot by
  less than one group), never a class's last group;
- with ``imbalance``, val is carved first by whole groups until each class
  has ``val_per_class`` images, then trimmed to exactly ``val_per_class``
  (the trimmed images of those groups are left unused, never trained on);
  train is then subsampled on the profile by images from the groups left,
  and ``n_max`` defaults to the largest value they allow; ``test_lt`` is
  the test set subsampled by images as before.
- a group spanning classes counts toward the quota of its majority class
  (ties: the first class) and moves whole, its other images with it.

Without groups the splits are exactly those of the code before groups.

The options travel as one validated :class:`SplitOptions`; the result is a
:class:`~decouple.stage_one.manifest.Manifest`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from decouple.errors import ConfigError, DataError
from decouple.profiles import exponential_counts
from decouple.stage_one.images import drop_bad_images
from decouple.stage_one.manifest import SPLIT_NAMES, Manifest, PathLike, SplitItems
from decouple.stage_one.sources import SourceData, load_source

#: ``--train-profile``: train on the long-tailed profile, or on its balanced sibling.
TRAIN_PROFILES = ("long_tailed", "balanced")


@dataclass(frozen=True)
class SplitOptions:
    """How a source is split (the ``decouple extract`` flags of the same names)."""

    imbalance: Optional[float] = None
    n_max: Optional[int] = None
    val_per_class: int = 20
    val_fraction: float = 0.1
    min_val_per_class: int = 1
    test_fraction: float = 0.2
    seed: int = 0
    group_by: Optional[str] = None
    train_profile: str = TRAIN_PROFILES[0]

    def __post_init__(self) -> None:
        if self.imbalance is not None and not self.imbalance >= 1:
            raise ConfigError(f"--imbalance must be >= 1; got {self.imbalance}")
        if self.train_profile not in TRAIN_PROFILES:
            raise ConfigError(
                f"--train-profile must be one of {', '.join(TRAIN_PROFILES)}; got {self.train_profile!r}"
            )
        if self.train_profile == "balanced" and self.imbalance is None:
            raise ConfigError(
                "--train-profile balanced needs --imbalance IF: the long-tailed profile whose val, test, "
                "test_lt and shot groups it shares"
            )
        if self.n_max is not None and self.n_max < 1:
            raise ConfigError(f"--n-max must be >= 1; got {self.n_max}")
        for name in ("val_per_class", "min_val_per_class", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0; got {getattr(self, name)}")
        for name in ("val_fraction", "test_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must lie in [0, 1); got {getattr(self, name)}")
        if self.group_by is not None:
            group_pattern(self.group_by)


def group_pattern(pattern: str) -> "re.Pattern[str]":
    """``--group-by``'s regular expression, compiled; it needs a capture group to name the group."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"--group-by '{pattern}' is not a regular expression ({exc})") from None
    if compiled.groups < 1:
        raise ConfigError(
            f"--group-by '{pattern}' has no capture group; its first (...) names the group, e.g. '^(\\d+)_'"
        )
    return compiled


def name_groups(items: SplitItems, pattern: str) -> SplitItems:
    """``items`` with the group of each image: the first capture group of ``pattern``
    searched in its file name, within its class (``"<class index>:<capture>"``:
    numbering that restarts in every class folder, as GTSRB's tracks do, never
    merges two classes' groups). DataError naming the first name that does not match."""
    compiled = group_pattern(pattern)
    groups: List[str] = []
    unmatched = []
    for ref, label in zip(items.refs, items.labels.tolist()):
        name = os.path.basename(ref)
        match = compiled.search(name)
        if match is None or not match.group(1):
            unmatched.append(ref)
        else:
            groups.append(f"{label}:{match.group(1)}")
    if unmatched:
        raise DataError(
            f"{unmatched[0]}: file name {os.path.basename(unmatched[0])!r} does not match --group-by '{pattern}' "
            f"({len(unmatched)} of {len(items)} images do not); every image needs a group, its first capture group"
        )
    return SplitItems(items.refs, items.labels, groups)


# --------------------------------------------------------------------------- building blocks


def _rng(seed: int, *purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed, *purpose])


def _per_class(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> List[np.ndarray]:
    """Indices of each class, in a seeded random order."""
    return [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]


def stratified_carve(
    labels: np.ndarray,
    num_classes: int,
    *,
    fraction: float,
    minimum: int,
    seed: int,
    purpose: int = 0,
    groups: Optional[Sequence[str]] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """Split indices into (kept, carved): per class max(minimum, round(fraction * n)),
    but never a class's last image; with ``groups`` (N,), whole groups (see :func:`group_carve`)."""
    if not 0 <= fraction < 1:
        raise ConfigError(f"split fraction must lie in [0, 1); got {fraction}")
    class_counts = np.bincount(labels, minlength=num_classes)
    # per class: max(minimum, round(fraction * n)) but never the last image (np.round, like round, to even)
    targets = np.minimum(
        np.maximum(minimum, np.round(fraction * class_counts).astype(np.int64)), np.maximum(class_counts - 1, 0)
    )
    if groups is not None:
        return group_carve(labels, groups, num_classes, targets=targets, seed=seed, purpose=purpose)
    kept, carved = [], []
    for indices, take in zip(_per_class(labels, num_classes, _rng(seed, purpose)), targets.tolist()):
        carved.append(indices[:take])
        kept.append(indices[take:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(carved))


def group_carve(
    labels: np.ndarray,
    groups: Sequence[str],
    num_classes: int,
    *,
    targets: np.ndarray,
    seed: int,
    purpose: int = 0,
) -> Tuple[np.ndarray, np.ndarray]:
    """Split indices into (kept, carved) by whole groups: groups in a seeded order,
    each taken while its class (its majority label, ties to the first) has fewer
    than ``targets`` (C,) carved images and taking it leaves every class it
    holds at least one kept image. A class may end above its target by less
    than one group, or below it when only its last group is left."""
    labels = np.asarray(labels, dtype=np.int64)
    names, group_of = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    by_group = np.argsort(group_of, kind="stable")
    members = np.split(by_group, np.cumsum(np.bincount(group_of, minlength=len(names)))[:-1])
    remaining = np.bincount(labels, minlength=num_classes)
    carved_counts = np.zeros(num_classes, dtype=np.int64)
    carved: List[np.ndarray] = []
    for g in _rng(seed, purpose).permutation(len(names)):
        classes, counts = np.unique(labels[members[g]], return_counts=True)
        majority = classes[np.argmax(counts)]
        if carved_counts[majority] >= targets[majority] or (remaining[classes] - counts < 1).any():
            continue
        carved.append(members[g])
        carved_counts[classes] += counts
        remaining[classes] -= counts
    carved_indices = np.sort(np.concatenate(carved)) if carved else np.zeros(0, dtype=np.int64)
    kept_indices = np.setdiff1d(np.arange(len(labels)), carved_indices)
    return kept_indices, carved_indices


def long_tail_counts(
    pool_counts: np.ndarray,
    imbalance: float,
    *,
    n_max: Optional[int] = None,
    reserve: int = 0,
    class_names: Optional[Sequence[str]] = None,
) -> np.ndarray:
    """Training counts (C,) on the exponential profile (Cao et al. 2019).

    ``n_max`` defaults to the largest value for which every class i still has
    ``reserve`` images beyond n_i. Raises DataError naming the first class
    whose pool is too small (by its name in ``class_names`` when given, else
    its index).
    """
    pool_counts = np.asarray(pool_counts, dtype=np.int64)
    num_classes = len(pool_counts)
    if imbalance < 1:
        raise ConfigError(f"--imbalance must be >= 1; got {imbalance}")

    def named(c: int) -> str:
        return repr(class_names[c]) if class_names is not None else str(c)

    if n_max is None:
        ratios = (1.0 / imbalance) ** (np.arange(num_classes) / max(num_classes - 1, 1))
        n_max = int(np.floor(np.min((pool_counts - reserve) / ratios) + 1e-9))
        if n_max < 1:
            short = int(np.argmin(pool_counts))
            raise DataError(
                f"class {named(short)} has {pool_counts[short]} images; the profile needs at least "
                f"{reserve + 1} ({reserve} for val)"
            )
    counts = exponential_counts(int(n_max), num_classes, imbalance)
    needed = counts + reserve
    short = np.flatnonzero(needed > pool_counts)
    if len(short):
        c = int(short[0])
        raise DataError(
            f"class {named(c)} has {pool_counts[c]} images; the profile (n_max={n_max}, imbalance {imbalance:g}) "
            f"asks {counts[c]}" + (f" plus {reserve} for val" if reserve else "")
        )
    return counts


# --------------------------------------------------------------------------- the steps of build_manifest


def _check_every_class_trains(data: SourceData, splits: Dict[str, SplitItems]) -> None:
    if "train" not in splits:
        raise DataError(f"{data.location}: no training split; expected train rows or an unsplit folder")
    counts = np.bincount(splits["train"].labels, minlength=len(data.class_names))
    if (counts == 0).any():
        empty = int(np.flatnonzero(counts == 0)[0])
        raise DataError(f"{data.location}: class {data.class_names[empty]!r} has no training images")


def _profile_counts(data: SourceData, train: SplitItems, options: SplitOptions, reserve: int) -> np.ndarray:
    """:func:`long_tail_counts` of the training pool, its errors naming the source, the class and the flags."""
    pool_counts = np.bincount(train.labels, minlength=len(data.class_names))
    try:
        return long_tail_counts(
            pool_counts, options.imbalance, n_max=options.n_max, reserve=reserve, class_names=data.class_names
        )
    except DataError as exc:
        raise DataError(f"{data.location}: {exc}; lower --n-max, --imbalance or --val-per-class") from None


def _subsample_long_tail(
    data: SourceData, splits: Dict[str, SplitItems], options: SplitOptions
) -> Tuple[Dict[str, Any], np.ndarray]:
    """Train on the profile (or its balanced sibling), val from the leftovers (unless the
    source has val), test_lt; returns the profile info and the profile's training counts (C,)."""
    num_classes = len(data.class_names)
    has_val = "val" in splits
    val_per_class = 0 if has_val else options.val_per_class
    train = splits["train"]
    if val_per_class > 0 and train.groups is not None:
        splits["val"], train = _carve_group_val(data, train, options)
        val_per_class_reserved = 0  # val is already out of the pool
    else:
        val_per_class_reserved = val_per_class
    train_counts = _profile_counts(data, train, options, reserve=val_per_class_reserved)
    n_max = int(train_counts[0])
    order = _per_class(train.labels, num_classes, _rng(options.seed, 2))
    if options.train_profile == "balanced":
        # the profile's images first, then those after its val images: a superset of the long-tailed train
        taken = [
            np.concatenate([idx[:n], idx[n + val_per_class_reserved :]])[:n_max] for idx, n in zip(order, train_counts)
        ]
    else:
        taken = [idx[:n] for idx, n in zip(order, train_counts)]
    if val_per_class_reserved > 0:
        leftover = np.concatenate([idx[n : n + val_per_class] for idx, n in zip(order, train_counts)])
        splits["val"] = train.subset(np.sort(leftover))
    splits["train"] = train.subset(np.sort(np.concatenate(taken)))
    if "test" in splits and "test_lt" not in splits:
        splits["test_lt"] = _long_tail_test(splits["test"], num_classes, options)
    profile = {"kind": "exponential", "n_max": n_max, "imbalance": options.imbalance, "val_per_class": val_per_class}
    if options.train_profile == "balanced":
        profile["short_classes"] = [data.class_names[c] for c, idx in enumerate(taken) if len(idx) < n_max]
    return profile, train_counts


def reference_source(profile: Dict[str, Any], seed: int) -> str:
    """One line naming a long-tailed profile (the ``source`` of its reference counts)."""
    return (
        f"{profile['kind']} long-tailed profile (Cao et al. 2019): imbalance {profile['imbalance']:g}, "
        f"n_max {profile['n_max']}, seed {seed}"
    )


def _carve_group_val(data: SourceData, train: SplitItems, options: SplitOptions) -> Tuple[SplitItems, SplitItems]:
    """(val, training pool): whole groups until each class has ``val_per_class``
    images, val trimmed to exactly that; the trimmed images stay out of both."""
    num_classes = len(data.class_names)
    targets = np.full(num_classes, options.val_per_class, dtype=np.int64)
    rest, carved = group_carve(train.labels, train.groups, num_classes, targets=targets, seed=options.seed, purpose=5)
    carved_items = train.subset(carved)
    order = _per_class(carved_items.labels, num_classes, _rng(options.seed, 6))
    short = [c for c in range(num_classes) if len(order[c]) < options.val_per_class]
    if short:
        c = short[0]
        in_class = train.labels == c
        group_count = len(set(np.asarray(train.groups, dtype=object)[in_class]))
        raise DataError(
            f"{data.location}: class {data.class_names[c]!r} has {int(in_class.sum())} images in {group_count} "
            f"group(s); a group-disjoint val of {options.val_per_class} needs that many from groups other than "
            f"one left for training; lower --val-per-class"
        )
    val = np.sort(np.concatenate([idx[: options.val_per_class] for idx in order]))
    return carved_items.subset(val), train.subset(rest)


def _long_tail_test(test: SplitItems, num_classes: int, options: SplitOptions) -> SplitItems:
    """The balanced test set subsampled on the training profile, from its smallest class."""
    test_counts = np.bincount(test.labels, minlength=num_classes)
    lt_counts = exponential_counts(int(test_counts.min()), num_classes, options.imbalance)
    test_order = _per_class(test.labels, num_classes, _rng(options.seed, 3))
    return test.subset(np.sort(np.concatenate([idx[:n] for idx, n in zip(test_order, lt_counts)])))


# --------------------------------------------------------------------------- manifests


def build_manifest(data: SourceData, options: SplitOptions = SplitOptions()) -> Manifest:
    """Train / val / test (/ test_lt) splits of a source, seeded (see the module docstring)."""
    num_classes = len(data.class_names)
    splits = dict(data.splits)
    info: Dict[str, Any] = {"source_location": data.location, "seed": options.seed, "imbalance": options.imbalance}
    if options.group_by is not None:
        splits = {name: name_groups(items, options.group_by) for name, items in splits.items()}
    if any(items.groups is not None for items in splits.values()):
        info["groups"] = _group_info(splits, options)
    if "all" in splits:
        pool = splits.pop("all")
        kept, carved = stratified_carve(
            pool.labels, num_classes, fraction=options.test_fraction, minimum=1, seed=options.seed, purpose=1,
            groups=pool.groups,
        )
        splits["train"], splits["test"] = pool.subset(kept), pool.subset(carved)
        info["test_carved"] = {"fraction": options.test_fraction}
    _check_every_class_trains(data, splits)
    info["train_profile"] = options.train_profile
    if options.imbalance is not None:
        info["profile"], reference_counts = _subsample_long_tail(data, splits, options)
        info["reference_counts"] = reference_counts.tolist()
        info["reference_source"] = reference_source(info["profile"], options.seed)
    elif "val" not in splits:
        train = splits["train"]
        kept, carved = stratified_carve(
            train.labels, num_classes, fraction=options.val_fraction, minimum=options.min_val_per_class,
            seed=options.seed, purpose=4, groups=train.groups,
        )
        splits["train"], splits["val"] = train.subset(kept), train.subset(carved)
        info["val_carved"] = {"fraction": options.val_fraction, "min_per_class": options.min_val_per_class}
    if "groups" in info:
        info["groups"]["classes_missing"] = _classes_missing(data, splits)
    ordered = {name: splits[name] for name in SPLIT_NAMES if name in splits and len(splits[name])}
    return Manifest(list(data.class_names), ordered, info)


def _classes_missing(data: SourceData, splits: Dict[str, SplitItems]) -> Dict[str, List[str]]:
    """Split -> the classes it has no image of (e.g. a class with one group,
    which stays in train); empty when every split holds every class."""
    missing = {}
    for name in ("val", "test"):
        if name in splits:
            counts = np.bincount(splits[name].labels, minlength=len(data.class_names))
            absent = [data.class_names[c] for c in np.flatnonzero(counts == 0)]
            if absent:
                missing[name] = absent
    return missing


def _group_info(splits: Dict[str, SplitItems], options: SplitOptions) -> Dict[str, Any]:
    """Where the groups came from, how many, and how many span classes (recorded in the manifest info)."""
    classes_of: Dict[str, set] = {}
    for items in splits.values():
        for group, label in zip(items.groups or [], items.labels.tolist()):
            classes_of.setdefault(group, set()).add(label)
    return {
        "from": f"--group-by {options.group_by}" if options.group_by is not None else "manifest group column",
        "count": len(classes_of),
        "spanning_classes": sum(len(labels) > 1 for labels in classes_of.values()),
    }


def prepare_manifest(
    path: PathLike,
    options: SplitOptions = SplitOptions(),
    *,
    source: str = "auto",
    check_images: bool = True,
    strict: bool = False,
    workers: int = 4,
) -> Manifest:
    """Load a source, build its splits and (optionally) check every image decodes."""
    manifest = build_manifest(load_source(path, source=source), options)
    manifest.info["data"] = str(path)
    if check_images:
        manifest = drop_bad_images(manifest, strict=strict, workers=workers)
    return manifest
