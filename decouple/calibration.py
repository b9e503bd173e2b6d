"""Calibration of class scores: negative log-likelihood, expected calibration
error and temperature scaling. Pure functions, arrays in, numbers out.

Guo, Pleiss, Sun and Weinberger, "On Calibration of Modern Neural Networks"
(ICML 2017). A head's scores z (N, C) are read as logits: p = softmax(z / T).

- Negative log-likelihood (NLL): the mean over rows of -log p_y.
- Expected calibration error (ECE, their Eq. 3): confidences max_c p_c are
  put into ``bins`` (15) equal-width bins (lo, hi] over [0, 1], and
  ECE = sum_b |B_b| / n * |acc(B_b) - conf(B_b)|, where acc is the fraction
  of rows in the bin whose argmax is the label and conf their mean
  confidence. The binning is that of the authors' reference code
  (github.com/gpleiss/temperature_scaling, ``_ECELoss``:
  ``conf > lower & conf <= upper``), with the bin edges k / bins in float64
  where the reference builds them in float32.
- Temperature scaling (their Sec. 4.2): the one T > 0 that minimises the
  NLL of softmax(z / T) on a held-out split (here always val). It divides
  every logit by the same T, so predictions, accuracy and the ranking of
  classes never change; only the confidence does.

Everything is computed in float64 over chunks of rows, so a split of many
classes never needs a float64 copy of its whole score matrix.
Log-probabilities are floored at log(float64 tiny) (about -708.4), so the
NLL is finite even where a head gives the label a probability of exactly 0
(e.g. a score of -inf).
"""

from __future__ import annotations

from typing import Iterator, Tuple

import numpy as np
from scipy.optimize import minimize_scalar

DEFAULT_BINS = 15
#: The floor of every log-probability: log of the smallest normal float64.
LOG_PROB_FLOOR = float(np.log(np.finfo(np.float64).tiny))
#: The temperatures :func:`fit_temperature` searches, relative to the
#: spread of the scores (:func:`temperature_bounds`): heads' scores live on
#: any scale (logits of tens, cosines of NCM that differ by 1e-3 on
#: non-negative features), and T is a scale of the same kind. The NLL is
#: convex in 1 / T, so the optimum is unique; it lies on a bound only for
#: degenerate scores (a split classified perfectly with huge margins wants
#: T -> 0; scores no better than chance want T -> infinity).
RELATIVE_TEMPERATURE_BOUNDS = (1e-3, 1e3)
#: Absolute tolerance of the search on log T: T to about 1e-7 relative.
_LOG_TEMPERATURE_TOLERANCE = 1e-7
#: Score entries converted to float64 at a time (32 MB).
_CHUNK_ENTRIES = 1 << 22


def _checked(labels, scores) -> Tuple[np.ndarray, np.ndarray]:
    """``labels`` as int64 (N,) and ``scores`` (N, C), checked against each other."""
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a 2-D array (N, C); got shape {scores.shape}")
    if labels.ndim != 1 or len(labels) != len(scores):
        raise ValueError(f"labels must be a 1-D array of {len(scores)} rows like scores; got shape {labels.shape}")
    if len(labels) and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers; got dtype {labels.dtype}")
    if len(labels) and (labels.min() < 0 or labels.max() >= scores.shape[1]):
        raise ValueError(
            f"labels must lie in [0, {scores.shape[1]}); got min {labels.min()}, max {labels.max()}"
        )
    return labels.astype(np.int64, copy=False), scores


def _row_chunks(scores: np.ndarray) -> Iterator[Tuple[int, np.ndarray]]:
    """(start, rows start.. of ``scores`` (N, C) in float64), about
    :data:`_CHUNK_ENTRIES` entries at a time."""
    step = max(1, _CHUNK_ENTRIES // max(scores.shape[1], 1))
    for start in range(0, len(scores), step):
        yield start, np.asarray(scores[start:start + step], dtype=np.float64)


def calibratable(scores) -> bool:
    """Whether ``scores`` (N, C) can be read as logits: no NaN or +inf, and a
    finite maximum in every row (-inf entries are fine). A diverged head
    gives scores that are not; its calibration is then not defined."""
    return all(np.all(np.isfinite(chunk.max(axis=1))) for _, chunk in _row_chunks(np.asarray(scores)))


def _checked_temperature(temperature: float) -> float:
    value = float(temperature)
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}")
    return value


def _shifted_chunks(scores: np.ndarray, temperature: float):
    """(start, (z - max z) / T, argmax z) over chunks of rows, in float64.

    The largest entry of every shifted row is exactly 0, so exp of it sums
    to at least 1 and nothing overflows. A row whose maximum is NaN, +inf or
    -inf (a NaN anywhere, or no finite score) is refused.
    """
    for start, chunk in _row_chunks(scores):
        top = chunk.max(axis=1)
        if not np.all(np.isfinite(top)):
            row = start + int(np.flatnonzero(~np.isfinite(top))[0])
            raise ValueError(
                "scores must be finite or -inf, with a finite maximum in every row; "
                f"row {row} has maximum {top[row - start]}"
            )
        yield start, (chunk - top[:, None]) / temperature, chunk.argmax(axis=1)


def _label_log_probs(labels: np.ndarray, scores: np.ndarray, temperature: float) -> np.ndarray:
    """log p_y of each row (N,), floored at :data:`LOG_PROB_FLOOR`."""
    out = np.empty(len(labels), dtype=np.float64)
    for start, shifted, _ in _shifted_chunks(scores, temperature):
        rows = np.arange(len(shifted))
        stop = start + len(shifted)
        out[start:stop] = shifted[rows, labels[start:stop]] - np.log(np.exp(shifted).sum(axis=1))
    return np.maximum(out, LOG_PROB_FLOOR)


def log_softmax(scores, temperature: float = 1.0) -> np.ndarray:
    """log softmax(scores / temperature) (N, C) in float64, floored at
    :data:`LOG_PROB_FLOOR` so that every entry is finite. ``scores`` (N, C)."""
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a 2-D array (N, C); got shape {scores.shape}")
    temperature = _checked_temperature(temperature)
    out = np.empty(scores.shape, dtype=np.float64)
    for start, shifted, _ in _shifted_chunks(scores, temperature):
        log_total = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        out[start:start + len(shifted)] = shifted - log_total
    return np.maximum(out, LOG_PROB_FLOOR)


def negative_log_likelihood(labels, scores, temperature: float = 1.0) -> float:
    """Mean over rows of -log softmax(scores / temperature)[label]; NaN for no rows.

    ``labels`` (N,) in [0, C), ``scores`` (N, C).
    """
    labels, scores = _checked(labels, scores)
    temperature = _checked_temperature(temperature)
    if len(labels) == 0:
        return float("nan")
    return float(-np.mean(_label_log_probs(labels, scores, temperature))) + 0.0  # + 0.0: never -0.0


def expected_calibration_error(labels, scores, temperature: float = 1.0, bins: int = DEFAULT_BINS) -> float:
    """ECE of softmax(scores / temperature) over ``bins`` equal-width
    confidence bins (lo, hi] (Guo et al. 2017, Eq. 3); NaN for no rows.

    Confidence is the largest probability of a row, accuracy whether its
    argmax (the first, on ties) is the label. ``labels`` (N,), ``scores`` (N, C).
    """
    labels, scores = _checked(labels, scores)
    temperature = _checked_temperature(temperature)
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"bins must be an integer >= 1; got {bins!r}")
    if len(labels) == 0:
        return float("nan")
    confidence = np.empty(len(labels), dtype=np.float64)
    correct = np.empty(len(labels), dtype=np.float64)
    for start, shifted, predictions in _shifted_chunks(scores, temperature):
        stop = start + len(shifted)
        # The top class's shifted score is 0, so its probability is 1 / sum exp:
        # exactly 1 / C for C tied scores, which keeps bin edges like 1/2 exact.
        confidence[start:stop] = 1.0 / np.exp(shifted).sum(axis=1)
        correct[start:stop] = predictions == labels[start:stop]
    edges = np.linspace(0.0, 1.0, int(bins) + 1)
    # searchsorted(side="left") - 1 is b with edges[b] < conf <= edges[b + 1];
    # a confidence of 0 (impossible: it is at least 1 / C) would fall in no bin, as in the reference.
    index = np.searchsorted(edges, confidence, side="left") - 1
    inside = index >= 0
    gaps = np.bincount(index[inside], weights=(correct - confidence)[inside], minlength=int(bins))
    # sum_b |B|/n * |acc(B) - conf(B)| = sum_b |sum over B of (correct - conf)| / n
    return float(np.abs(gaps).sum() / len(labels))


def temperature_bounds(scores) -> Tuple[float, float]:
    """The range :func:`fit_temperature` searches: RELATIVE_TEMPERATURE_BOUNDS
    times the spread of ``scores`` (N, C), the mean over rows of the range
    (max - min) of their finite scores; (0, 0) when every row is constant."""
    spreads = []
    for _, block in _row_chunks(np.asarray(scores)):
        finite = np.isfinite(block)
        high = np.where(finite, block, -np.inf).max(axis=1)
        low = np.where(finite, block, np.inf).min(axis=1)
        spreads.append(np.where(finite.any(axis=1), high - low, 0.0))
    spread = float(np.concatenate(spreads).mean()) if spreads else 0.0
    low, high = RELATIVE_TEMPERATURE_BOUNDS
    return low * spread, high * spread


def fit_temperature(labels, scores) -> float:
    """The temperature T > 0 minimising the NLL of softmax(scores / T) on
    these rows (Guo et al. 2017, Sec. 4.2); 1.0 for no rows.

    The NLL is convex in 1 / T (a log-sum-exp of a linear function minus a
    linear function), hence unimodal in log T, so a deterministic bounded
    Brent search over log T within :func:`temperature_bounds` finds its
    minimum. Where that minimum is no lower than the NLL at T = 1 (e.g. all
    scores equal, where T changes nothing), 1.0 is returned, so scaling
    never raises the NLL of the rows it was fitted on.
    ``labels`` (N,), ``scores`` (N, C).
    """
    labels, scores = _checked(labels, scores)
    if len(labels) == 0:
        return 1.0

    def nll_at(log_temperature: float) -> float:
        return float(-np.mean(_label_log_probs(labels, scores, float(np.exp(log_temperature)))))

    low, high = temperature_bounds(scores)
    if not low > 0:
        return 1.0  # every row's scores equal: T changes nothing
    found = minimize_scalar(
        nll_at,
        bounds=(np.log(low), np.log(high)),
        method="bounded",
        options={"xatol": _LOG_TEMPERATURE_TOLERANCE, "maxiter": 500},
    )
    if not found.fun < nll_at(0.0):  # found.fun: the NLL at found.x
        return 1.0
    return float(np.exp(found.x))
