"""Long-tail profiles: how many training images each class keeps.

The exponential profile of Cao et al., "Learning Imbalanced Datasets with
Label-Distribution-Aware Margin Loss" (NeurIPS 2019), used to build
CIFAR-10/100-LT: n_i = floor(n_max * (1 / IF) ** (i / (C - 1))).
"""

from __future__ import annotations

import numpy as np

from decouple.errors import ConfigError


def exponential_counts(n_max: int, num_classes: int, imbalance_factor: float) -> np.ndarray:
    """Per-class counts (C,) from ``n_max`` down to ``n_max / imbalance_factor``.

    >>> exponential_counts(5000, 10, 100).sum()
    12406
    """
    if num_classes < 1:
        raise ConfigError(f"number of classes must be at least 1; got {num_classes}")
    if imbalance_factor < 1:
        raise ConfigError(f"imbalance factor must be >= 1; got {imbalance_factor}")
    if num_classes == 1:
        return np.array([int(n_max)], dtype=np.int64)
    exponents = np.arange(num_classes) / (num_classes - 1)
    counts = np.floor(n_max * (1.0 / imbalance_factor) ** exponents + 1e-9).astype(np.int64)
    return np.maximum(counts, 1)
