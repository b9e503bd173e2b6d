"""Synthetic long-tailed Gaussian features, for tests, benchmarks and checks.

Class means lie on a sphere of radius ``radius`` in random directions and
every class has unit isotropic noise, so on a balanced split the Bayes
classifier is the nearest true mean (equal norms make it the largest inner
product). Training counts follow the exponential profile of Cao et al. 2019;
val and test are balanced.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from decouple.features import FeatureSet, Split
from decouple.profiles import exponential_counts


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
    means = _sphere_means(rng, num_classes, dim, radius)
    train_counts = exponential_counts(n_max, num_classes, imbalance_factor)

    splits = _draw_splits(
        lambda labels: means[labels] + rng.standard_normal((len(labels), dim)),
        rng, train_counts, n_val=n_val, n_test=n_test, dtype=dtype,
    )
    feature_set = FeatureSet(
        class_names=[f"class_{index:03d}" for index in range(num_classes)],
        splits=splits,
        backbone="synthetic-gaussian",
        attrs={"generator": "decouple.synthetic.gaussian_long_tailed", "seed": seed, "radius": radius},
    )
    return feature_set, means


def _sphere_means(rng: np.random.Generator, num_classes: int, dim: int, radius: float) -> np.ndarray:
    """Class means (C, D) on the sphere of radius ``radius``, in random directions."""
    directions = rng.standard_normal((num_classes, dim))
    return radius * directions / np.linalg.norm(directions, axis=1, keepdims=True)


def _draw_splits(features_of, rng: np.random.Generator, train_counts: np.ndarray, *, n_val: int, n_test: int,
                 dtype) -> Dict[str, Split]:
    """train (``train_counts`` rows per class), val and test (``n_val`` and
    ``n_test`` per class), each drawn by ``features_of(labels)`` and shuffled."""
    num_classes = len(train_counts)

    def draw(counts: np.ndarray) -> Split:
        labels = np.repeat(np.arange(num_classes), counts)
        features = features_of(labels)
        order = rng.permutation(len(labels))
        return Split(features=features[order].astype(dtype), labels=labels[order].astype(np.int64))

    return {
        "train": draw(train_counts),
        "val": draw(np.full(num_classes, n_val)),
        "test": draw(np.full(num_classes, n_test)),
    }


def nearest_mean_accuracy(features: np.ndarray, labels: np.ndarray, means: np.ndarray) -> float:
    """Accuracy of the nearest-true-mean rule: the Bayes classifier on balanced data."""
    distances = ((features[:, None, :] - means[None, :, :]) ** 2).sum(axis=2)
    return float(np.mean(distances.argmin(axis=1) == labels))


def embedding_like_long_tailed(
    *,
    num_classes: int = 43,
    dim: int = 512,
    latent_dim: int = 32,
    n_max: int = 1000,
    imbalance_factor: float = 200.0,
    n_val: int = 20,
    n_test: int = 50,
    radius: float = 3.0,
    scale_decades: float = 2.0,
    seed: int = 0,
    dtype=np.float32,
) -> FeatureSet:
    """Long-tailed features shaped like a CNN's pooled embeddings.

    Gaussian classes in a ``latent_dim``-dimensional space (means on a sphere
    of radius ``radius``, unit noise) are mixed into ``dim`` channels by a
    random matrix, shifted, passed through a ReLU and scaled per channel by
    factors spread over ``scale_decades`` powers of ten. The result is
    non-negative, sparse, correlated across channels, anisotropic and
    unnormalised, which is what makes a linear probe on real embeddings
    ill-conditioned; the class structure stays (close to) linearly
    decodable. Training counts follow the exponential profile; val and test
    are balanced.
    """
    rng = np.random.default_rng(seed)
    means = _sphere_means(rng, num_classes, latent_dim, radius)
    mixing = rng.standard_normal((latent_dim, dim)) / np.sqrt(latent_dim)
    offsets = rng.normal(-0.5, 0.5, size=dim)
    channel_scales = 10.0 ** rng.uniform(-scale_decades, 0.0, size=dim) * 4.0
    train_counts = exponential_counts(n_max, num_classes, imbalance_factor)

    def embed(labels: np.ndarray) -> np.ndarray:
        latent = means[labels] + rng.standard_normal((len(labels), latent_dim))
        hidden = latent @ mixing + offsets + 0.3 * rng.standard_normal((len(labels), dim))
        return np.maximum(hidden, 0.0) * channel_scales

    splits = _draw_splits(embed, rng, train_counts, n_val=n_val, n_test=n_test, dtype=dtype)
    return FeatureSet(
        class_names=[f"class_{index:03d}" for index in range(num_classes)],
        splits=splits,
        backbone="synthetic-embedding",
        attrs={"generator": "decouple.synthetic.embedding_like_long_tailed", "seed": seed},
    )
