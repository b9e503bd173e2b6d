"""Per-image predictions of a scored split, stored compactly.

Every scored split of a cell keeps its true labels and the top-k predicted
classes of each image (k = min(5, C), best first; column 0 is the argmax,
ties to the lowest class index). From these alone the label-based metrics
(top-1, top-5, per-class accuracy and F1, many / medium / few) can be
recomputed on any resample of the images, which is what the bootstrap
confidence intervals of ``decouple export --ci`` and ``decouple recommend``
do, with no head refitted.

Encoding (the results database and the ``decouple head --json`` result):
each array is the smallest unsigned integer type that holds C - 1 (uint8,
uint16 or uint32), little-endian, row-major, zlib-compressed; in JSON the
bytes are base64 text::

    {"n": 10000, "k": 5, "dtype": "uint8",
     "labels": "<base64 zlib (n,)>", "top": "<base64 zlib (n, k)>"}

10,000 CIFAR-10 test images take about 20 kB.
"""

from __future__ import annotations

import base64
import zlib
from dataclasses import dataclass
from typing import Any, Dict, Mapping

import numpy as np

#: How many ranked predictions each image keeps (fewer when C is smaller).
TOP_K = 5
_DTYPES = ("uint8", "uint16", "uint32")


def top_k_labels(scores: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """The ``k`` highest-scoring classes of each row, best first (N, min(k, C)).

    Column 0 is ``scores.argmax(axis=1)``: equal scores are ordered by class
    index, lowest first, as argmax breaks ties, and NaN (a diverged head)
    ranks above every number, as argmax ranks it.
    """
    scores = np.asarray(scores)
    k = min(k, scores.shape[1])
    nan = np.isnan(scores)
    if nan.any():  # rare: a full sort by (NaN first, score descending, class index)
        index = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
        order = np.lexsort((index, -np.where(nan, 0.0, scores), ~nan), axis=1)
        return order[:, :k]
    if k == scores.shape[1]:
        candidates = np.broadcast_to(np.arange(k), scores.shape)
    else:
        candidates = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    values = np.take_along_axis(scores, candidates, axis=1)
    # lexsort's last key is the primary one: the score (descending), then the class index.
    order = np.lexsort((candidates, -values), axis=1)
    return np.take_along_axis(candidates, order, axis=1)


def label_dtype(num_classes: int) -> str:
    """The smallest unsigned integer type that holds class indices 0..C-1."""
    for name in _DTYPES:
        if num_classes - 1 <= np.iinfo(name).max:
            return name
    raise ValueError(f"{num_classes} classes do not fit in uint32")


def pack(array: np.ndarray, dtype: str) -> bytes:
    """``array`` as zlib-compressed little-endian ``dtype`` bytes."""
    return zlib.compress(np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<")).tobytes(), 6)


def unpack(data: bytes, dtype: str, shape: tuple) -> np.ndarray:
    """The array :func:`pack` stored, as int64 of ``shape``; a size that does not
    match ``shape`` is a ValueError."""
    if dtype not in _DTYPES:
        raise ValueError(f"prediction dtype must be one of {', '.join(_DTYPES)}; got {dtype!r}")
    flat = np.frombuffer(zlib.decompress(data), dtype=np.dtype(dtype).newbyteorder("<"))
    if flat.size != int(np.prod(shape)):
        raise ValueError(f"stored predictions hold {flat.size} values; expected shape {shape}")
    return flat.astype(np.int64).reshape(shape)


@dataclass
class SplitPredictions:
    """One scored split: true ``labels`` (N,) and ranked predictions ``top`` (N, k)."""

    labels: np.ndarray
    top: np.ndarray
    num_classes: int

    @classmethod
    def from_scores(cls, labels: np.ndarray, scores: np.ndarray, k: int = TOP_K) -> "SplitPredictions":
        scores = np.asarray(scores)
        return cls(np.asarray(labels, dtype=np.int64), top_k_labels(scores, k), int(scores.shape[1]))

    @property
    def predicted(self) -> np.ndarray:
        """The top-1 prediction of each image (N,)."""
        return self.top[:, 0]

    @property
    def dtype(self) -> str:
        return label_dtype(self.num_classes)

    def to_json(self) -> Dict[str, Any]:
        """The compact JSON form (module docstring); :meth:`from_json` reads it back equal."""
        return {
            "n": int(len(self.labels)),
            "k": int(self.top.shape[1]),
            "num_classes": self.num_classes,
            "dtype": self.dtype,
            "labels": base64.b64encode(pack(self.labels, self.dtype)).decode("ascii"),
            "top": base64.b64encode(pack(self.top, self.dtype)).decode("ascii"),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "SplitPredictions":
        n, k, dtype = int(data["n"]), int(data["k"]), str(data["dtype"])
        return cls(
            labels=unpack(base64.b64decode(data["labels"]), dtype, (n,)),
            top=unpack(base64.b64decode(data["top"]), dtype, (n, k)),
            num_classes=int(data["num_classes"]),
        )

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, SplitPredictions)
            and self.num_classes == other.num_classes
            and np.array_equal(self.labels, other.labels)
            and np.array_equal(self.top, other.top)
        )
