"""Split health: do the held-out splits sit as far from train as new images would?

A val split carved from the training pool of a collection whose photos come
in bursts (several frames of one object) is leaky: its images have
near-copies in train, val scores run high (val 70% against test 52% in the
case that prompted this check) and choosing a method on val rewards
memorisation. :func:`split_health` measures, on the cached embeddings, how
close every held-out split (val, test, test_lt, ...) sits to train, and
flags a split that is leaky in either of two ways.

**Nearest training neighbour.** Every embedding is L2-normalised (float32)
and searched in an exact inner-product FAISS index of the training
embeddings (``IndexFlatIP``, in chunks of queries, never an N x N matrix; on
the GPU when FAISS sees one, as the knn and ncm heads do). Per split: the
distribution of the cosine similarity to the nearest training image (median
and quantiles) and the 1-NN accuracy (the nearest training image's label).

**Near-duplicates by image.** Where the feature file holds the images'
fingerprints (``decouple extract`` writes them: a perceptual DCT hash of
each image and of its mirror, :func:`decouple.stage_one.images.image_fingerprints`),
a held-out image is a near-copy of every training image whose hash, or
mirrored hash, differs from its own in at most ``FINGERPRINT_BITS`` of 63
bits (exact Hamming search in a FAISS binary index). This is what the
duplicate counts and pairs use when every compared split has fingerprints:
it asks whether two files hold the same photograph, which embeddings answer
only as well as the backbone keeps instance detail (below). On CIFAR-10,
flipped and JPEG re-encoded (quality 30 to 95) copies of training images
sit within 4 bits (flips at 0), while clean test images sit at 6 bits or
more from every training image except the test set's own near-copies of
training photographs. Near-uniform images (blank frames, plain
backgrounds) hash little more than rounding noise and can match one
another.

**Near-duplicates by embedding** (files without fingerprints). A held-out image is a near-copy of training images
t_1..t_m (its m nearest, 1 <= m <= ``MAX_GROUP``) when, with d_i = 1 -
cosine to its i-th nearest training image,

1. *ratio test* (Lowe, "Distinctive Image Features from Scale-Invariant
   Keypoints", IJCV 2004, section 7.1): d_m <= r * d_{m+1}: the match is
   distinctive, not merely close; the smallest such m counts, so a copy of
   an image that train holds several frames of (a burst of up to
   ``MAX_GROUP``) is found too, paired with each frame;
2. *floor relative to train*: d_m <= the median over training images of
   the distance to their own nearest other training image (on
   ``FLOOR_SAMPLE`` seeded training rows): the copy sits at least as close
   as neighbouring training images typically sit to each other.

An exact copy (d_1 <= ``EXACT``) always counts, with every training image
it equals.

The threshold r is calibrated on the file, not fixed. Under a locally
uniform density of intrinsic dimension k, P(d_1 / d_2 <= r) = r^(k/2) on
clean data (1 - cosine is half the squared Euclidean distance; Levina and
Bickel, NIPS 2004), so the same r errs very differently on a collapsed
64-dimensional CIFAR ResNet-32 (k about 14) and an ImageNet backbone (k
about 27). k is estimated from train's own neighbour-distance ratios and r
is set so that r^(k/2) = ``FALSE_RATE`` (0.25%; real embeddings have a
heavier low tail than the model, and the observed rate on clean CIFAR-10
test images runs up to about twice that), at most ``MAX_RATIO`` = 0.64
(Lowe's 0.8 on Euclidean distances), beyond which a ratio is no evidence of
copying. On CIFAR-10 that gives r = 0.43 for a trained ResNet-32 and 0.64
for an ImageNet EfficientNet-Lite0.

Why no fixed cosine threshold: absolute cosines mean nothing across
backbones. On CIFAR-10 the nearest training image of a clean test image
sits at cosine 0.96 (median) in a trained ResNet-32 and 0.9998 in an
untrained one, while a flipped copy of a training image sits at 0.62-0.85
in an ImageNet EfficientNet-Lite0: a fixed floor is either met by every
pair or missed by real copies. The floor of condition 2 guards the
few-shot case that the ratio test alone gets wrong: a held-out image of a
class with one or two training images has those as its nearest, far ahead
of any other class, without being a copy (on tight synthetic classes
down to one training image, 7 false duplicates in 2,000 clean test images
with the floor, 602 without). Copies that an embedding keeps no closer
than ordinary neighbours cannot be told apart and are missed rather than
guessed at; ``benchmarks/split_health.py`` measures both kinds of error on
CIFAR-10.

**Leak test.** Split A is compared with every other held-out split B by a
one-sided, class-stratified Mann-Whitney U test (van Elteren, "On the
combination of independent two-sample tests of Wilcoxon", Bull. ISI 1960)
on their nearest-training-neighbour cosines: H1, an image of A sits closer
to train than an image of B of the same class. Stratifying by class keeps a
class mix from posing as a leak: a long-tailed split (test_lt) holds
mostly head classes, whose images sit closer to their many training
neighbours than a balanced split's do. The statistic sums each class's
U - n_A n_B / 2 with weight 1 / (n_A + n_B + 1) (ties get average ranks
and the tie-corrected variance; normal approximation). The effect size is
the stratified AUC, sum_c w_c U_c / sum_c w_c n_A n_B: the probability that
an image of A sits closer to train than one of B of its class, 0.5 when
they are alike. A is *closer than* B when p < ``ALPHA`` and AUC >=
``MIN_AUC``. The floor keeps a huge split from being flagged for a
negligible shift that any p-value finds: AUC 0.6 is Cohen's d of about
0.36 between two normal samples, or about a fifth of the split sitting
wholly closer than the rest (AUC = 0.5 + f / 2 for a fraction f).

**Flagged.** A split is flagged when it sits closer to train than another
held-out split does, or when at least ``DUPLICATE_FRACTION`` (2%) of its
images are near-duplicates of training images (the only test left when it
is the one held-out split): copies can raise a split's accuracy by at most
their fraction, so below 2% they move it by less than the noise of most
comparisons, and the count is reported anyway. CIFAR-10's own test set
holds near-copies of its training images (Barz and Denzler, "Do We Train
on Test Data? Purging CIFAR of Near-Duplicates", J. Imaging 2020: 3.3% of
its test images); against the 12,355 training images of CIFAR-10-LT the
check finds 0.56%, against the whole training set it may rightly flag it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import faiss
import numpy as np

from decouple.atomic import write_text_atomic
from decouple.features import FeatureSet, PathLike, read_features

FALSE_RATE = 0.0025
MAX_RATIO = 0.64
MAX_GROUP = 4
EXACT = 1e-6
FLOOR_SAMPLE = 2000
ALPHA = 1e-3
MIN_AUC = 0.6
DUPLICATE_FRACTION = 0.02
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
CHUNK = 4096
DUPLICATES_HEADER = "split,index,train_index,cosine"
FINGERPRINT_BITS = 4


@dataclass
class DuplicatePairs:
    """Near-duplicate pairs of one held-out split, P rows: ``index`` in the
    split, ``train_index`` in /train, their ``cosine`` (P,) each."""

    index: np.ndarray
    train_index: np.ndarray
    cosine: np.ndarray

    def __len__(self) -> int:
        return len(self.index)


@dataclass
class SplitHealth:
    """What :func:`split_health` found.

    ``splits`` maps each held-out split to a JSON-ready dict (what ``decouple
    info --json`` prints under ``split_health``): ``n``,
    ``nn_cosine_median``, ``nn_cosine_quantiles``, ``nn_cosine_mean``,
    ``one_nn_accuracy``, ``near_duplicates`` (images with at least one),
    ``near_duplicate_fraction``, ``near_duplicate_pairs``, ``leak_tests``
    (per other held-out split: ``auc``, ``p_value``, ``closer``),
    ``flagged`` and ``reasons``. ``pairs`` holds the duplicate pairs.
    """

    splits: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    pairs: Dict[str, DuplicatePairs] = field(default_factory=dict)
    criteria: Dict[str, Any] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def flagged(self) -> List[str]:
        """The flagged splits, in file order."""
        return [name for name, report in self.splits.items() if report["flagged"]]

    def warnings(self) -> List[str]:
        """One line per flagged split, for logs."""
        return [
            f"warning: {name} looks leaky: {'; '.join(self.splits[name]['reasons'])}; its scores may "
            f"overstate new images (decouple info --duplicates FILE lists the pairs; --group-by keeps "
            f"bursts in one split)"
            for name in self.flagged
        ]

    def duplicates_csv(self) -> str:
        """``split,index,train_index,cosine``, one row per pair."""
        lines = [DUPLICATES_HEADER]
        for name, pairs in self.pairs.items():
            lines.extend(
                f"{name},{int(row)},{int(train_row)},{float(cosine):.6f}"
                for row, train_row, cosine in zip(pairs.index, pairs.train_index, pairs.cosine)
            )
        return "\n".join(lines) + "\n"

    def write_duplicates(self, path: PathLike) -> None:
        """Write :meth:`duplicates_csv` to ``path`` atomically."""
        write_text_atomic(path, self.duplicates_csv())


# --------------------------------------------------------------------------- search


def _normalised(block: np.ndarray) -> np.ndarray:
    block = np.ascontiguousarray(block, dtype=np.float32)
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    return block / np.maximum(norms, 1e-12)


def training_index(train_features: np.ndarray, *, chunk: int = CHUNK):
    """An exact inner-product index of the L2-normalised training rows (N, D),
    added in chunks; on the GPU when FAISS sees one (the convention of
    :func:`decouple.stage_two.heads.faiss_index`). Returns (index, gpu
    resources or None)."""
    index = faiss.IndexFlatIP(int(train_features.shape[1]))
    resources = None
    if (faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0) > 0:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, index)
    for start in range(0, len(train_features), chunk):
        index.add(_normalised(train_features[start : start + chunk]))
    return index, resources


def nearest_training(index: Any, queries: np.ndarray, k: int, *, chunk: int = CHUNK) -> Tuple[np.ndarray, np.ndarray]:
    """Cosines (M, k) and training rows (M, k) of the ``k`` nearest training
    images of each query row (M, D), nearest first, searched ``chunk`` rows at a time."""
    k = min(int(k), int(index.ntotal))
    cosines = np.empty((len(queries), k), dtype=np.float32)
    rows = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), chunk):
        found_cos, found_rows = index.search(_normalised(queries[start : start + chunk]), k)
        cosines[start : start + len(found_cos)] = found_cos
        rows[start : start + len(found_rows)] = found_rows
    return np.clip(cosines, -1.0, 1.0), rows


@dataclass
class TrainNeighbourhood:
    """What the duplicate criterion takes from train itself (module docstring):
    ``floor``, the median distance (1 - cosine) of a training image to its
    nearest other training image; ``dimension``, the local intrinsic dimension
    estimated from the ratios of successive neighbour distances; ``ratio``,
    the ratio-test threshold that dimension gives. None where train is too
    small to tell."""

    floor: Optional[float]
    dimension: Optional[float]
    ratio: Optional[float]


def train_neighbourhood(index: Any, train_features: np.ndarray, *, sample: int = FLOOR_SAMPLE,
                        max_group: int = MAX_GROUP, false_rate: float = FALSE_RATE,
                        max_ratio: float = MAX_RATIO, seed: int = 0) -> TrainNeighbourhood:
    """Floor, intrinsic dimension and ratio threshold from ``sample`` seeded
    training rows and their nearest other training rows.

    Under a locally uniform density of intrinsic dimension k, (T_j /
    T_{j+1})^k ~ Beta(j, 1) for Euclidean neighbour distances T (Levina and
    Bickel, "Maximum Likelihood Estimation of Intrinsic Dimension", NIPS
    2004); with d = 1 - cosine = T^2 / 2, the median m_j of d_j / d_{j+1}
    gives k = 2 ln 2 / (j (-ln m_j)). The estimate is the median over j = 1 ..
    ``max_group`` + 1 (medians and the larger j keep bursts in train from
    pulling it down), and the ratio threshold is the r with r^(k/2) =
    ``false_rate``, at most ``max_ratio``."""
    n = len(train_features)
    if n < 2:
        return TrainNeighbourhood(floor=None, dimension=None, ratio=None)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False))
    cosines, found = nearest_training(index, train_features[rows], max_group + 3)
    # Drop each row's own entry (an exact copy may tie with it and come first).
    own = found == rows[:, None]
    own[~own.any(axis=1), -1] = True
    distances = np.maximum(1.0 - cosines[~own].reshape(len(rows), -1).astype(np.float64), 0.0)
    floor = float(np.median(distances[:, 0]))
    dimensions = []
    for j in range(1, distances.shape[1]):
        defined = distances[:, j] > 0
        if not defined.any():
            continue
        median = float(np.median(distances[defined, j - 1] / distances[defined, j]))
        if median <= 0:
            dimensions.append(0.0)
        else:
            dimensions.append(np.inf if median >= 1 else 2 * math.log(2) / (j * -math.log(median)))
    if not dimensions:
        return TrainNeighbourhood(floor=floor, dimension=None, ratio=None)
    dimension = float(np.median(dimensions))
    ratio = 0.0 if dimension == 0 else min(max_ratio, false_rate ** (2.0 / dimension))
    return TrainNeighbourhood(floor=floor, dimension=dimension, ratio=ratio)


def duplicate_groups(cosines: np.ndarray, *, floor: Optional[float], ratio: Optional[float],
                     max_group: int = MAX_GROUP, exact: float = EXACT) -> np.ndarray:
    """How many of its nearest training images (M,) each query is a near-copy
    of (0: none), from its sorted nearest-neighbour cosines (M, k); see the
    module docstring for the criterion."""
    distances = np.maximum(1.0 - cosines.astype(np.float64), 0.0)
    groups = np.zeros(len(distances), dtype=np.int64)
    if floor is not None and ratio is not None:
        for m in range(1, min(max_group, distances.shape[1] - 1) + 1):
            near, after = distances[:, m - 1], distances[:, m]
            hit = (groups == 0) & (near <= ratio * after) & (near <= floor)
            groups[hit] = m
    exact_copies = (distances <= exact).sum(axis=1)
    groups = np.where((groups == 0) & (exact_copies > 0), exact_copies, groups)
    return groups


def fingerprint_pairs(train_fingerprints: np.ndarray, fingerprints: np.ndarray, *,
                      max_bits: int = FINGERPRINT_BITS) -> Tuple[np.ndarray, np.ndarray]:
    """(index, train_index) of every held-out image (fingerprints (M, 2)) and
    training image (train_fingerprints (N, 2)) whose hashes differ in at
    most ``max_bits`` bits, the training image's mirror included; sorted,
    each pair once."""
    train = np.ascontiguousarray(train_fingerprints, dtype=np.uint64)
    index = faiss.IndexBinaryFlat(64)
    index.add(np.ascontiguousarray(np.concatenate([train[:, 0], train[:, 1]])).view(np.uint8).reshape(-1, 8))
    queries = np.ascontiguousarray(np.asarray(fingerprints, dtype=np.uint64)[:, 0]).view(np.uint8).reshape(-1, 8)
    limits, _, found = index.range_search(queries, max_bits + 1)  # distances < radius
    rows = np.repeat(np.arange(len(queries)), np.diff(limits).astype(np.int64))
    pairs = np.unique(np.stack([rows, found % len(train)], axis=1), axis=0) if len(rows) else np.zeros((0, 2), int)
    return pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)


# --------------------------------------------------------------------------- the leak test


def _stratum_u(a: np.ndarray, b: np.ndarray) -> Tuple[float, float]:
    """Mann-Whitney U of ``a`` over ``b`` (pairs a > b, ties half) and its
    tie-corrected null variance."""
    n_a, n_b = len(a), len(b)
    total = n_a + n_b
    _, inverse, counts = np.unique(np.concatenate([a, b]), return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0
    u = float(average_rank[inverse[:n_a]].sum() - n_a * (n_a + 1) / 2.0)
    ties = float((counts.astype(np.float64) ** 3 - counts).sum())
    variance = n_a * n_b / 12.0 * ((total + 1) - ties / (total * (total - 1))) if total > 1 else 0.0
    return u, variance


def stratified_closeness(a: np.ndarray, a_labels: np.ndarray, b: np.ndarray, b_labels: np.ndarray) -> Dict[str, Any]:
    """Is sample ``a`` (e.g. nearest-training-neighbour cosines of val) larger
    than ``b`` within classes? The van Elteren test (one-sided, normal
    approximation); returns ``auc`` (stratified, 0.5 when alike; None when no
    class has images in both), ``p_value``, ``z`` and ``classes`` (compared)."""
    statistic = variance = weighted_u = weighted_pairs = 0.0
    classes = np.intersect1d(np.unique(a_labels), np.unique(b_labels))
    for label in classes:
        x, y = a[a_labels == label], b[b_labels == label]
        u, var = _stratum_u(x, y)
        weight = 1.0 / (len(x) + len(y) + 1)
        statistic += weight * (u - len(x) * len(y) / 2.0)
        variance += weight * weight * var
        weighted_u += weight * u
        weighted_pairs += weight * len(x) * len(y)
    if weighted_pairs == 0:
        return {"auc": None, "p_value": 1.0, "z": 0.0, "classes": 0}
    z = statistic / math.sqrt(variance) if variance > 0 else 0.0
    return {
        "auc": weighted_u / weighted_pairs,
        "p_value": 0.5 * math.erfc(z / math.sqrt(2.0)),
        "z": z,
        "classes": int(len(classes)),
    }


# --------------------------------------------------------------------------- the check


def split_health(
    feature_set: FeatureSet,
    *,
    splits: Optional[Sequence[str]] = None,
    ratio: Optional[float] = None,
    false_rate: float = FALSE_RATE,
    max_ratio: float = MAX_RATIO,
    max_group: int = MAX_GROUP,
    floor_sample: int = FLOOR_SAMPLE,
    alpha: float = ALPHA,
    min_auc: float = MIN_AUC,
    duplicate_fraction: float = DUPLICATE_FRACTION,
    chunk: int = CHUNK,
    seed: int = 0,
) -> SplitHealth:
    """Compare every held-out split of ``feature_set`` (or those named in
    ``splits``) with train: nearest-training-neighbour cosines, 1-NN
    accuracy, near-duplicates and the leak test (module docstring). Without
    a train split or a held-out split it reports what it can, with a note."""
    started = time.perf_counter()
    criteria: Dict[str, Any] = {
        "false_rate": false_rate, "max_ratio": max_ratio, "max_group": max_group, "exact": EXACT,
        "floor_sample": floor_sample, "alpha": alpha, "min_auc": min_auc, "duplicate_fraction": duplicate_fraction,
    }
    health = SplitHealth(criteria=criteria)
    held_out = [name for name in (splits if splits is not None else feature_set.splits) if name != "train"]
    if "train" not in feature_set.splits:
        health.notes.append("no train split: nothing to compare the held-out splits with")
        return health
    if not held_out:
        health.notes.append("no held-out split: nothing to check")
        return health
    train = feature_set.splits["train"]
    index, _resources = training_index(train.features, chunk=chunk)
    neighbourhood = train_neighbourhood(
        index, train.features, sample=floor_sample, max_group=max_group, false_rate=false_rate,
        max_ratio=max_ratio, seed=seed,
    )
    if ratio is None:
        ratio = neighbourhood.ratio
    floor = neighbourhood.floor
    dimension = neighbourhood.dimension
    if dimension is not None and not math.isfinite(dimension):
        dimension = None  # no finite estimate: JSON has no infinity
    by_images = train.fingerprints is not None and all(
        feature_set.splits[name].fingerprints is not None for name in held_out
    )
    criteria.update(ratio=ratio, floor=floor, dimension=dimension,
                    duplicates_by="image fingerprints" if by_images else "embeddings",
                    fingerprint_bits=FINGERPRINT_BITS if by_images else None)
    nearest: Dict[str, np.ndarray] = {}
    for name in held_out:
        split = feature_set.splits[name]
        cosines, rows = nearest_training(index, split.features, max_group + 1, chunk=chunk)
        if by_images:
            pair_rows, pair_train = fingerprint_pairs(train.fingerprints, split.fingerprints)
            pair_cosines = np.einsum("ij,ij->i", _normalised(split.features[pair_rows]),
                                     _normalised(train.features[pair_train]))
            health.pairs[name] = DuplicatePairs(index=pair_rows, train_index=pair_train, cosine=pair_cosines)
            count = int(len(np.unique(pair_rows)))
        else:
            groups = duplicate_groups(cosines, floor=floor, ratio=ratio, max_group=max_group)
            has_copy = np.flatnonzero(groups > 0)
            in_group = np.arange(rows.shape[1])[None, :] < groups[:, None]  # (M, k): the pairs, row by row
            health.pairs[name] = DuplicatePairs(
                index=np.repeat(has_copy, groups[has_copy]), train_index=rows[in_group], cosine=cosines[in_group]
            )
            count = int(len(has_copy))
        nearest[name] = cosines[:, 0].astype(np.float64)
        health.splits[name] = {
            "n": int(len(split)),
            "nn_cosine_median": float(np.median(nearest[name])),
            "nn_cosine_quantiles": {f"{q:g}": float(np.quantile(nearest[name], q)) for q in QUANTILES},
            "nn_cosine_mean": float(nearest[name].mean()),
            "one_nn_accuracy": float(np.mean(train.labels[rows[:, 0]] == split.labels)),
            "near_duplicates": count,
            "near_duplicate_fraction": count / len(split),
            "near_duplicate_pairs": int(len(health.pairs[name])),
            "leak_tests": {},
            "flagged": False,
            "reasons": [],
        }
    if len(held_out) == 1:
        health.notes.append(f"{held_out[0]} is the only held-out split: only near-duplicates can flag it")
    for name in held_out:
        report = health.splits[name]
        for other in held_out:
            if other == name:
                continue
            test = stratified_closeness(
                nearest[name], feature_set.splits[name].labels, nearest[other], feature_set.splits[other].labels
            )
            test["closer"] = bool(test["auc"] is not None and test["p_value"] < alpha and test["auc"] >= min_auc)
            report["leak_tests"][other] = test
            if test["closer"]:
                theirs = health.splits[other]
                report["reasons"].append(
                    f"it sits closer to train than {other} does (nearest-training-neighbour cosine median "
                    f"{report['nn_cosine_median']:.3f} vs {theirs['nn_cosine_median']:.3f}, 1-NN accuracy "
                    f"{report['one_nn_accuracy']:.1%} vs {theirs['one_nn_accuracy']:.1%}; class-stratified "
                    f"AUC {test['auc']:.2f}, p = {test['p_value']:.1g})"
                )
        if report["near_duplicates"] and report["near_duplicate_fraction"] >= duplicate_fraction:
            report["reasons"].append(
                f"{report['near_duplicates']} of its {report['n']} images "
                f"({report['near_duplicate_fraction']:.1%}) are near-duplicates of training images"
            )
        report["flagged"] = bool(report["reasons"])
    health.seconds = time.perf_counter() - started
    criteria["seconds"] = health.seconds
    return health


def check_file(path: PathLike, **options: Any) -> SplitHealth:
    """:func:`split_health` of the feature file at ``path``."""
    return split_health(read_features(path), **options)
