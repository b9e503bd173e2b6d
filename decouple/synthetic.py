"""Synthetic long-tailed Gaussian features, for tests, benchmarks and checks.

Class means lie on a sphere of radius ``radius`` in random directions and
every class has unit isotropic noise, so on a balanced split the Bayes
classifier is the nearest true mean (equal norms make it the largest inner
product). Training counts follow the exponential profile of Cao et al. 2019;
val and test are balanced.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from .features import FeatureSet, Split
from .profiles import exponential_counts


def gaussian_long_tailed(
    *,
    num_classes: int = 20,
    dim: int = 32,
    n_max: int = 500,
    imbalance_factor: float = 100.0,
    n_val: int = 50,
    n_test: int = 100,
    radius: float = 3.0,
    seed: int = 0,
    dtype=np.float32,
) -> Tuple[FeatureSet, np.ndarray]:
    """A long-tailed train split and balanced val / test splits.

    Returns the :class:`FeatureSet` and the true class means (C, D).
    """
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((num_classes, dim))
    means = radius * directions / np.linalg.norm(directions, axis=1, keepdims=True)
    train_counts = exponential_counts(n_max, num_classes, imbalance_factor)

    def draw(counts: np.ndarray) -> Split:
        labels = np.repeat(np.arange(num_classes), counts)
        features = means[labels] + rng.standard_normal((len(labels), dim))
        order = rng.permutation(len(labels))
        return Split(features=features[order].astype(dtype), labels=labels[order].astype(np.int64))

    splits = {
        "train": draw(train_counts),
        "val": draw(np.full(num_classes, n_val)),
        "test": draw(np.full(num_classes, n_test)),
    }
    feature_set = FeatureSet(
        class_names=[f"class_{index:03d}" for index in range(num_classes)],
        splits=splits,
        backbone="synthetic-gaussian",
        attrs={"generator": "decouple.synthetic.gaussian_long_tailed", "seed": seed, "radius": radius},
    )
    return feature_set, means


def nearest_mean_accuracy(features: np.ndarray, labels: np.ndarray, means: np.ndarray) -> float:
    """Accuracy of the nearest-true-mean rule: the Bayes classifier on balanced data."""
    distances = ((features[:, None, :] - means[None, :, :]) ** 2).sum(axis=2)
    return float(np.mean(distances.argmin(axis=1) == labels))
