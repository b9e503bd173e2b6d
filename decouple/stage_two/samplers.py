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
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Sequence, Tuple, Union

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
        self.class_counts = np.bincount(self.labels, minlength=self.num_classes)
        # Row indices grouped by class: class c's rows are
        # _order[_starts[c] : _starts[c] + class_counts[c]].
        self._order = np.argsort(self.labels, kind="stable")
        self._starts = np.concatenate([[0], np.cumsum(self.class_counts)[:-1]])

    def set_epoch(self, epoch: int) -> None:
        """Set the (0-based) epoch: it seeds the draw and moves any schedule."""
        self.epoch = _check_int("epoch", epoch, 0)

    def class_probabilities(self) -> np.ndarray:  # pragma: no cover - abstract
        """Probability of drawing each class this epoch, (C,)."""
        raise NotImplementedError

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
