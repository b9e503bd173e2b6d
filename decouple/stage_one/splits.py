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

The options travel as one validated :class:`SplitOptions`; the result is a
:class:`~decouple.stage_one.manifest.Manifest`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from decouple.errors import ConfigError, DataError
from decouple.profiles import exponential_counts
from decouple.stage_one.images import drop_bad_images
from decouple.stage_one.manifest import SPLIT_NAMES, Manifest, PathLike, SplitItems
from decouple.stage_one.sources import SourceData, load_source


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

    def __post_init__(self) -> None:
        if self.imbalance is not None and not self.imbalance >= 1:
            raise ConfigError(f"--imbalance must be >= 1; got {self.imbalance}")
        if self.n_max is not None and self.n_max < 1:
            raise ConfigError(f"--n-max must be >= 1; got {self.n_max}")
        for name in ("val_per_class", "min_val_per_class", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0; got {getattr(self, name)}")
        for name in ("val_fraction", "test_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must lie in [0, 1); got {getattr(self, name)}")


# --------------------------------------------------------------------------- building blocks


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


def _subsample_long_tail(data: SourceData, splits: Dict[str, SplitItems], options: SplitOptions) -> Dict[str, Any]:
    """Train on the profile, val from the leftovers (unless the source has val), test_lt; returns the profile info."""
    num_classes = len(data.class_names)
    has_val = "val" in splits
    val_per_class = 0 if has_val else options.val_per_class
    train = splits["train"]
    train_counts = _profile_counts(data, train, options, reserve=val_per_class)
    order = _per_class(train.labels, num_classes, _rng(options.seed, 2))
    chosen = np.sort(np.concatenate([idx[:n] for idx, n in zip(order, train_counts)]))
    if val_per_class > 0:
        leftover = np.concatenate([idx[n : n + val_per_class] for idx, n in zip(order, train_counts)])
        splits["val"] = train.subset(np.sort(leftover))
    splits["train"] = train.subset(chosen)
    if "test" in splits and "test_lt" not in splits:
        splits["test_lt"] = _long_tail_test(splits["test"], num_classes, options)
    return {
        "kind": "exponential",
        "n_max": int(train_counts[0]),
        "imbalance": options.imbalance,
        "val_per_class": val_per_class,
    }


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
    if "all" in splits:
        pool = splits.pop("all")
        kept, carved = stratified_carve(
            pool.labels, num_classes, fraction=options.test_fraction, minimum=1, seed=options.seed, purpose=1
        )
        splits["train"], splits["test"] = pool.subset(kept), pool.subset(carved)
        info["test_carved"] = {"fraction": options.test_fraction}
    _check_every_class_trains(data, splits)
    if options.imbalance is not None:
        info["profile"] = _subsample_long_tail(data, splits, options)
    elif "val" not in splits:
        train = splits["train"]
        kept, carved = stratified_carve(
            train.labels, num_classes, fraction=options.val_fraction, minimum=options.min_val_per_class,
            seed=options.seed, purpose=4,
        )
        splits["train"], splits["val"] = train.subset(kept), train.subset(carved)
        info["val_carved"] = {"fraction": options.val_fraction, "min_per_class": options.min_val_per_class}
    ordered = {name: splits[name] for name in SPLIT_NAMES if name in splits and len(splits[name])}
    return Manifest(list(data.class_names), ordered, info)


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
