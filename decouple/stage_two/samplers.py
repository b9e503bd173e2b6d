"""Class re-samplers (a registry).

A sampler decides, each epoch, which training rows a model sees:
``create_sampler("class_balanced", labels, total_epochs=30, seed=0)``. Stage
two indexes its in-memory features with :meth:`ClassSampler.epoch_indices`
(one vectorised draw per epoch); stage one hands the sampler to a
``DataLoader`` (wrapped in :class:`DistributedClassSampler` under DDP).

Every registered sampler draws classes with probability p_c proportional to
n_c**q, then an instance uniformly within the class (Kang et al.,
"Decoupling Representation and Classifier for Long-Tailed Recognition",
ICLR 2020): q = 1 is instance-balanced, q = 0 class-balanced,
q = 1/2 square-root sampling; progressive interpolates between q = 1 and
q = 0 over the epochs. Classes without samples get probability 0 and the
others are renormalised.

Randomness comes from ``numpy.random.default_rng([seed, epoch])``, so the
indices of an epoch depend on (seed, epoch) only: every DDP rank computes
the same epoch, and re-running an epoch gives the same indices.

A sampler may also add training rows: one whose ``synthesizes_features`` is
True (``calibrated_features``) is handed the standardised training features
once by stage two's trainer (:meth:`CalibratedFeatureSampler.augment`), returns
synthetic rows, and from then on draws indices over the real and synthetic
rows together. Such a sampler is stage two's only: stage one's image loader
refuses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler

from decouple.errors import ConfigError, DataError
from decouple.registry import Registry

SAMPLERS = Registry("sampler")
register_sampler = SAMPLERS.register
#: Sampler constructor arguments that stage two sets itself, not the user.
SAMPLER_HOUSEKEEPING = ("labels", "total_epochs", "seed", "num_samples", "num_classes")

LabelsLike = Union[np.ndarray, Sequence[int], Tensor]


def as_labels(labels: LabelsLike, *, num_classes: Optional[int] = None) -> np.ndarray:
    """Validate integer class labels (N,) and return them as int64 numpy."""
    if isinstance(labels, Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise DataError(
            f"sampler labels must be a non-empty 1-D array (N,); got shape {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"sampler labels must be integers; got dtype {labels.dtype}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise DataError(f"sampler labels must be >= 0; got min {low}")
    if num_classes is not None and high >= num_classes:
        raise DataError(f"sampler labels must lie in [0, {num_classes}); got max {high}")
    return labels.astype(np.int64, copy=False)


def power_class_probabilities(class_counts: np.ndarray, power: float) -> np.ndarray:
    """p_c proportional to n_c**power over classes with n_c > 0; 0 for empty classes, (C,)."""
    counts = np.asarray(class_counts, dtype=np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    # Relative to the largest count so large powers cannot overflow.
    weights[present] = (counts[present] / counts[present].max()) ** power
    return weights / weights.sum()


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ConfigError(f"sampler parameter {name} must be an integer >= {low}; got {value!r}")
    return int(value)


class ClassSampler(Sampler[int]):
    """Base of every class re-sampler over ``labels`` (N,) (numpy array, list or tensor).

    ``num_samples`` (default N) indices are drawn per epoch; ``total_epochs``
    matters to schedules such as progressive sampling; ``num_classes``
    (default max label + 1) sets the length of :meth:`class_probabilities`.
    Subclasses define :meth:`class_probabilities`.
    """

    #: Whether the sampler adds synthetic feature rows (stage two's trainer
    #: then calls its ``augment``; see :class:`CalibratedFeatureSampler`).
    synthesizes_features: bool = False

    def __init__(
        self,
        labels: LabelsLike,
        *,
        total_epochs: int = 1,
        seed: int = 0,
        num_samples: Optional[int] = None,
        num_classes: Optional[int] = None,
    ) -> None:
        super().__init__()
        if num_classes is not None:
            num_classes = _check_int("num_classes", num_classes, 1)
        self.labels = as_labels(labels, num_classes=num_classes)
        self.num_classes = num_classes if num_classes is not None else int(self.labels.max()) + 1
        self.total_epochs = _check_int("total_epochs", total_epochs, 1)
        self.seed = _check_int("seed", seed, 0)
        self.num_samples = (
            len(self.labels) if num_samples is None else _check_int("num_samples", num_samples, 1)
        )
        self.epoch = 0
        self._index_labels(self.labels)

    def _index_labels(self, labels: np.ndarray) -> None:
        """Draw from ``labels`` (N,): their class counts, and the row indices
        grouped by class (class c's rows are
        _order[_starts[c] : _starts[c] + class_counts[c]])."""
        self.labels = labels
        self.class_counts = np.bincount(labels, minlength=self.num_classes)
        self._order = np.argsort(labels, kind="stable")
        self._starts = np.concatenate([[0], np.cumsum(self.class_counts)[:-1]])

    def set_epoch(self, epoch: int) -> None:
        """Set the (0-based) epoch: it seeds the draw and moves any schedule."""
        self.epoch = _check_int("epoch", epoch, 0)

    def class_probabilities(self) -> np.ndarray:  # pragma: no cover - abstract
        """Probability of drawing each class this epoch, (C,)."""
        raise NotImplementedError

    def trained_prior(self) -> np.ndarray:
        """The class distribution of the rows drawn in the last training
        epoch, (C,): the prior a head trained on them learns
        (:mod:`decouple.stage_two.priors`)."""
        current = self.epoch
        self.set_epoch(self.total_epochs - 1)
        try:
            return self.class_probabilities()
        finally:
            self.epoch = current

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])

    def _draw_by_class(self, rng: np.random.Generator) -> np.ndarray:
        """num_samples i.i.d. draws: a class from class_probabilities(), then a row in it."""
        classes = rng.choice(self.num_classes, size=self.num_samples, p=self.class_probabilities())
        offsets = rng.integers(0, self.class_counts[classes])
        return self._order[self._starts[classes] + offsets]

    def _indices(self, rng: np.random.Generator) -> np.ndarray:
        return self._draw_by_class(rng)

    def epoch_indices(self) -> Tensor:
        """Indices (num_samples,) int64 of the current epoch; a function of (seed, epoch)."""
        return torch.from_numpy(np.ascontiguousarray(self._indices(self._rng()), dtype=np.int64))

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices().tolist())

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(N={len(self.labels)}, num_classes={self.num_classes}, "
            f"num_samples={self.num_samples}, seed={self.seed}, epoch={self.epoch})"
        )


def create_sampler(
    name: str,
    labels: LabelsLike,
    *,
    total_epochs: int = 1,
    seed: int = 0,
    num_samples: Optional[int] = None,
    **params,
) -> ClassSampler:
    """Build the sampler registered as ``name`` over ``labels`` (N,).

    An unknown name raises UnknownNameError listing the known samplers; an
    unknown keyword raises ConfigError naming it (both are ValueErrors).
    """
    return SAMPLERS.create(
        name, labels, total_epochs=total_epochs, seed=seed, num_samples=num_samples, **params
    )


def list_samplers() -> List[Tuple[str, str]]:
    """(name, one-line description) of every registered sampler."""
    return SAMPLERS.describe()


@register_sampler("instance")
class InstanceSampler(ClassSampler):
    """Instance-balanced sampling: every image equally likely (p_c = n_c / N).

    The default of standard training (Kang et al., ICLR 2020, q = 1). With
    num_samples == N an epoch is a random permutation of all rows; otherwise
    consecutive random permutations are concatenated and cut to num_samples,
    so every row is drawn with probability 1/N per draw and as evenly as
    possible across the epoch.
    """

    def class_probabilities(self) -> np.ndarray:
        return power_class_probabilities(self.class_counts, 1.0)

    def _indices(self, rng: np.random.Generator) -> np.ndarray:
        total = len(self.labels)
        rounds = -(-self.num_samples // total)
        if rounds == 1:
            return rng.permutation(total)[: self.num_samples]
        return np.concatenate([rng.permutation(total) for _ in range(rounds)])[: self.num_samples]


@register_sampler("class_balanced")
class ClassBalancedSampler(ClassSampler):
    """Class-balanced sampling: every class equally likely, then an image uniformly within it.

    Class-aware sampling of Shen et al., "Relay Backpropagation for Effective
    Learning of Deep Convolutional Neural Networks" (ECCV 2016), as used by
    Kang et al., "Decoupling Representation and Classifier for Long-Tailed
    Recognition" (ICLR 2020): p_c = 1 / C' over the C' classes with samples
    (q = 0). Draws are independent, with replacement.
    """

    def class_probabilities(self) -> np.ndarray:
        return power_class_probabilities(self.class_counts, 0.0)


@register_sampler("square_root")
class SquareRootSampler(ClassSampler):
    """Square-root sampling: class probability proportional to sqrt(n_c).

    Mahajan et al., "Exploring the Limits of Weakly Supervised Pretraining"
    (ECCV 2018), as used by Kang et al. (ICLR 2020): p_c = n_c**(1/2) /
    sum_k n_k**(1/2) (q = 1/2), then an image uniformly within the class.
    """

    def class_probabilities(self) -> np.ndarray:
        return power_class_probabilities(self.class_counts, 0.5)


@register_sampler("progressive")
class ProgressiveSampler(ClassSampler):
    """Progressively-balanced sampling: from instance-balanced to class-balanced over the epochs.

    Kang et al., "Decoupling Representation and Classifier for Long-Tailed
    Recognition" (ICLR 2020): p_c(t) = (1 - a) p_c^IB + a p_c^CB with
    a = t / (T - 1) for epoch t = 0 .. T - 1 (T = total_epochs; a = 0 when
    T = 1, and a stays 1 past the last epoch). The paper writes a = t / T,
    which never reaches class-balanced in an epoch loop 0 .. T - 1; with
    T - 1 the first epoch is exactly instance-balanced and the last exactly
    class-balanced. Classes are drawn i.i.d. from p(t), then an image
    uniformly within the class.
    """

    def balance_fraction(self) -> float:
        """a(t) in [0, 1]: the class-balanced share of the current epoch."""
        if self.total_epochs == 1:
            return 0.0
        return min(self.epoch / (self.total_epochs - 1), 1.0)

    def class_probabilities(self) -> np.ndarray:
        fraction = self.balance_fraction()
        instance = power_class_probabilities(self.class_counts, 1.0)
        balanced = power_class_probabilities(self.class_counts, 0.0)
        return (1.0 - fraction) * instance + fraction * balanced


def _check_number(name: str, value: object, *, positive: bool) -> float:
    """A finite number, > 0 (``positive``) or >= 0, else a ConfigError naming ``name``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not math.isfinite(value)
        or value < 0
        or (positive and value == 0)
    ):
        bound = "> 0" if positive else ">= 0"
        raise ConfigError(f"sampler parameter {name} must be a finite number {bound}; got {value!r}")
    return float(value)


#: Spawn key of the synthesis stream of CalibratedFeatureSampler, apart from
#: the (seed, epoch) streams of the epoch draws.
SYNTHESIS_STREAM = 1
#: Most random numbers drawn at once when synthesising (bounds the memory of a draw).
SYNTHESIS_CHUNK = 1 << 24


@dataclass(frozen=True)
class TailCalibration:
    """The calibrated Gaussian of one tail class (:meth:`CalibratedFeatureSampler.calibrations`).

    ``label`` the class; ``donors`` its nearest head classes, nearest first;
    ``mean`` (D,) the calibrated mean; ``spread`` alpha in feature units
    (the variance of the isotropic term); ``draws`` the synthetic rows it gets.
    """

    label: int
    donors: Tuple[int, ...]
    mean: Tensor
    spread: float
    draws: int


@register_sampler("calibrated_features")
class CalibratedFeatureSampler(InstanceSampler):
    """Tail classes topped up with features drawn from calibrated Gaussians, then instance-balanced draws.

    Distribution calibration of Yang et al., "Free Lunch for Few-shot
    Learning: Distribution Calibration" (ICLR 2021), applied to the tail of
    a long-tailed set as by Vigneswaran et al., "Feature Generation for
    Long-tail Classification" (TailCalib, ICVGIP 2021). A tail class's few
    images cannot estimate its feature distribution, so it borrows the
    statistics of the k head classes S_c whose means are nearest its own
    (Euclidean distance between class means):

        mean'_c  = (sum_{i in S_c} mu_i + mu_c) / (k + 1)
        Sigma'_c = (1 / k) sum_{i in S_c} Sigma_i + alpha' I

    with mu the class means and Sigma_i the empirical covariance of head
    class i (denominator n_i - 1, as the authors' ``np.cov``), all on the
    standardised training features stage two trains on. Each tail class c
    gets m_c = max(top_up_to - n_c, 0) rows drawn from N(mean'_c, Sigma'_c)
    with label c.

    Settings:

    * ``tail_below`` (20, the metrics' few-shot threshold): classes with
      1 <= n_c < T training images are tail, the others head (the donors),
      T = tail_below images, or tail_below x the largest class count when
      tail_below < 1. The largest class is always head, so there is always
      a donor. On a set without such classes (CIFAR-10-LT's smallest class
      has about 50 images) nothing is synthesised and the sampler is
      ``instance``.
    * ``k`` (2, the paper's): head classes per tail class; all of them when
      there are fewer.
    * ``alpha`` (0.1): the isotropic spread, in units of the mean per-feature
      variance of the standardised training features (alpha' = alpha x
      mean_d Var(x_d), FEATURE_NORM**2 / D on features of full rank), so one
      value means the same on every backbone.
    * ``top_up_to`` (None): images each tail class is topped up to, real and
      synthetic; None is the count of the smallest head class, so no tail
      class is left smaller than a head class.

    A draw needs no D x D matrix: with X_i head class i's centred rows
    (n_i, D), g_i ~ N(0, I_{n_i}) and e ~ N(0, I_D) independent,
    x = mean' + sum_{i in S_c} X_i^T g_i / sqrt(k (n_i - 1)) + sqrt(alpha') e
    has covariance sum_i X_i^T X_i / (k (n_i - 1)) + alpha' I = Sigma'_c
    (k n_i D multiply-adds per draw and donor).

    Where it departs from the authors' code (``distribution_calibration`` of
    Few_Shot_Distribution_Calibration/evaluate_DC.py, ``calibrate_distribution``
    of TailCalibX/libs/core/TailCalib.py):

    * Per class, not per image: they calibrate one Gaussian around each
      support image x_j (x_j in place of mu_c, donors nearest x_j) and draw
      from each; here one Gaussian around the class mean.
    * No Tukey power transform (x**lambda): it assumes non-negative (ReLU)
      features, and stage two's are standardised, of either sign.
    * alpha I: their code adds the scalar alpha to every entry of the
      covariance (alpha 1 1^T, a spread along the all-ones direction only);
      the paper's "+ alpha" is a degree of dispersion, read here as
      isotropic, the one reading that does not depend on the feature axes.
      Their EPS I for the Cholesky factor is not needed: no factor is taken.
    * Donors are the head classes only (Free Lunch's base classes);
      TailCalib searches all classes and tops every class up to the largest.

    :meth:`augment` takes the standardised training features (N, D), in the
    order of ``labels``, and returns the M synthetic rows (M, D), tail
    classes in label order; from then on ``labels`` are the N real then the
    M synthetic labels and each epoch draws ``num_samples`` (default N + M)
    indices instance-uniformly over all N + M rows, so class c is drawn with
    probability (n_c + m_c) / (N + M). Before it, draws are instance's over
    the N real rows. The synthesis draws from a torch generator seeded from
    ``seed`` alone: the same seed gives the same rows.
    """

    synthesizes_features = True

    def __init__(
        self,
        labels: LabelsLike,
        *,
        total_epochs: int = 1,
        seed: int = 0,
        num_samples: Optional[int] = None,
        num_classes: Optional[int] = None,
        tail_below: float = 20,
        k: int = 2,
        alpha: float = 0.1,
        top_up_to: Optional[int] = None,
    ) -> None:
        super().__init__(
            labels, total_epochs=total_epochs, seed=seed, num_samples=num_samples, num_classes=num_classes
        )
        self.tail_below = _check_number("tail_below", tail_below, positive=True)
        self.k = _check_int("k", k, 1)
        self.alpha = _check_number("alpha", alpha, positive=False)
        self.top_up_to = None if top_up_to is None else _check_int("top_up_to", top_up_to, 1)
        self.num_samples_given = num_samples
        self.real_labels = self.labels
        self.real_class_counts = self.class_counts
        self._real_order, self._real_starts = self._order, self._starts
        counts = self.real_class_counts
        threshold = self.tail_below * counts.max() if self.tail_below < 1 else self.tail_below
        is_tail = (counts > 0) & (counts < min(threshold, counts.max()))
        self.tail_classes = np.flatnonzero(is_tail)
        self.head_classes = np.flatnonzero((counts > 0) & ~is_tail)
        if self.top_up_to is not None:
            target = self.top_up_to
        else:
            target = int(counts[self.head_classes].min()) if len(self.head_classes) else 0
        self.synthetic_counts = np.zeros_like(counts)
        self.synthetic_counts[self.tail_classes] = np.maximum(target - counts[self.tail_classes], 0)

    def trained_prior(self) -> np.ndarray:
        """Real and synthetic rows drawn alike: p_c proportional to n_c + m_c
        (known before :meth:`augment`)."""
        counts = (self.real_class_counts + self.synthetic_counts).astype(np.float64)
        return counts / counts.sum()

    @torch.no_grad()
    def calibrations(self, features: Tensor) -> List[TailCalibration]:
        """The calibrated Gaussian of every tail class that gets draws, from
        the standardised training features (N, D) in the order of ``labels``."""
        x = self._checked_features(features)
        counts = torch.as_tensor(self.real_class_counts, dtype=x.dtype, device=x.device)
        labels = torch.as_tensor(self.real_labels, device=x.device)
        means = torch.zeros(self.num_classes, x.shape[1], dtype=x.dtype, device=x.device)
        means.index_add_(0, labels, x).div_(counts.clamp_min(1)[:, None])
        spread = self.alpha * float(x.var(dim=0, unbiased=False).mean())
        drawn = self.tail_classes[self.synthetic_counts[self.tail_classes] > 0]
        k = min(self.k, len(self.head_classes))
        host_means = means.detach().to("cpu", torch.float64)
        distances = torch.cdist(host_means[drawn], host_means[self.head_classes]).numpy()
        nearest = np.argsort(distances, axis=1, kind="stable")[:, :k]
        calibrations = []
        for label, donor_rows in zip(drawn, nearest):
            donors = self.head_classes[donor_rows]
            mean = (means[torch.as_tensor(donors, device=x.device)].sum(dim=0) + means[int(label)]) / (k + 1)
            calibrations.append(TailCalibration(
                label=int(label), donors=tuple(int(d) for d in donors), mean=mean, spread=spread,
                draws=int(self.synthetic_counts[label]),
            ))
        return calibrations

    def covariance(self, features: Tensor, calibration: TailCalibration) -> Tensor:
        """Sigma'_c (D, D) of ``calibration``, formed explicitly in float64:
        for checks on small D (the draws never form it)."""
        x = self._checked_features(features).detach().to("cpu", torch.float64)
        total = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        for donor in calibration.donors:
            rows = x[torch.as_tensor(self._rows_of(donor))]
            centred = rows - rows.mean(dim=0)
            total += centred.t() @ centred / max(len(rows) - 1, 1)
        return total / len(calibration.donors) + calibration.spread * torch.eye(x.shape[1], dtype=torch.float64)

    @torch.no_grad()
    def augment(self, features: Tensor) -> Tensor:
        """The synthetic rows (M, D) for the standardised training features
        ``features`` (N, D); afterwards ``labels`` and the epoch draws cover
        the N + M rows (the class docstring)."""
        x = self._checked_features(features)
        calibrations = self.calibrations(x)
        generator = torch.Generator().manual_seed(
            int(np.random.SeedSequence(self.seed, spawn_key=(SYNTHESIS_STREAM,)).generate_state(1, np.uint64)[0])
            % (1 << 63)
        )
        draws = [calibration.draws for calibration in calibrations]
        starts = np.concatenate([[0], np.cumsum(draws)]).astype(np.int64)
        rows = torch.empty(int(starts[-1]), x.shape[1], dtype=x.dtype, device=x.device)
        users: Dict[int, List[int]] = {}
        for index, calibration in enumerate(calibrations):
            rows[starts[index] : starts[index + 1]] = calibration.mean
            for donor in calibration.donors:
                users.setdefault(donor, []).append(index)
        for donor in sorted(users):
            donor_rows = x.index_select(0, torch.as_tensor(self._rows_of(donor), device=x.device))
            centred = donor_rows - donor_rows.mean(dim=0)
            # Every calibration has the same number of donors.
            weight = 1.0 / math.sqrt(len(calibrations[users[donor][0]].donors) * max(len(centred) - 1, 1))
            targets = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in users[donor]])
            step = max(1, SYNTHESIS_CHUNK // len(centred))
            for begin in range(0, len(targets), step):
                chunk = torch.as_tensor(targets[begin : begin + step], device=x.device)
                noise = torch.randn(len(chunk), len(centred), generator=generator, dtype=x.dtype)
                rows.index_add_(0, chunk, (noise.to(x.device) @ centred).mul_(weight))
        if calibrations and calibrations[0].spread > 0:
            step = max(1, SYNTHESIS_CHUNK // x.shape[1])
            for begin in range(0, len(rows), step):
                noise = torch.randn(min(step, len(rows) - begin), x.shape[1], generator=generator, dtype=x.dtype)
                rows[begin : begin + step] += noise.to(x.device).mul_(math.sqrt(calibrations[0].spread))
        self._extend(np.repeat([c.label for c in calibrations], draws).astype(np.int64))
        return rows

    def _rows_of(self, label: int) -> np.ndarray:
        """Indices of the real rows of class ``label``."""
        start = self._real_starts[label]
        return self._real_order[start : start + self.real_class_counts[label]]

    def _checked_features(self, features: Tensor) -> Tensor:
        if not isinstance(features, Tensor) or features.ndim != 2 or len(features) != len(self.real_labels):
            shape = tuple(features.shape) if hasattr(features, "shape") else type(features).__name__
            raise DataError(
                f"calibrated_features needs the training features as a tensor ({len(self.real_labels)}, D) "
                f"in the order of its labels; got {shape}"
            )
        if not features.is_floating_point():
            raise DataError(f"calibrated_features needs floating-point features; got {features.dtype}")
        return features

    def _extend(self, synthetic_labels: np.ndarray) -> None:
        """Make ``labels`` the real then the synthetic labels, and the epoch
        draws range over all of them."""
        self._index_labels(np.concatenate([self.real_labels, synthetic_labels]))
        if self.num_samples_given is None:
            self.num_samples = len(self.labels)


class DistributedClassSampler(Sampler[int]):
    """A :class:`ClassSampler` split across DDP ranks.

    Every rank computes the same ``epoch_indices`` (same seed and epoch),
    pads them to a multiple of ``num_replicas`` by wrapping around to the
    start, and keeps ``indices[rank::num_replicas]``, so ranks get equal
    numbers of indices that together are the whole (padded) epoch.
    """

    def __init__(self, sampler: ClassSampler, *, num_replicas: int, rank: int) -> None:
        super().__init__()
        self.sampler = sampler
        self.num_replicas = _check_int("num_replicas", num_replicas, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.num_replicas:
            raise ConfigError(f"rank must lie in [0, {self.num_replicas}); got {self.rank}")
        self.num_samples = -(-len(sampler) // self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Forward the (0-based) epoch to the wrapped sampler."""
        self.sampler.set_epoch(epoch)

    def class_probabilities(self) -> np.ndarray:
        return self.sampler.class_probabilities()

    def epoch_indices(self) -> Tensor:
        """This rank's indices (num_samples,) int64 of the current epoch."""
        indices = self.sampler.epoch_indices()
        padding = self.total_size - len(indices)
        if padding > 0:
            repeats = -(-padding // len(indices))
            indices = torch.cat([indices, indices.repeat(repeats)[:padding]])
        return indices[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices().tolist())

    def __len__(self) -> int:
        return self.num_samples
