"""Cells of stage two: one (head, loss, sampler, seed) each, validated
against the registries, their per-method settings routed to the head, the
loss and the sampler, and the result object of DESIGN.md."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from decouple.errors import ConfigError
from decouple.predictions import SplitPredictions
from decouple.provenance import jsonable
from decouple.stage_two.heads import HEADS
from decouple.stage_two.losses import LOSSES
from decouple.stage_two.samplers import SAMPLER_HOUSEKEEPING, SAMPLERS


@dataclass(frozen=True)
class Cell:
    """One (head, loss, sampler, seed) to fit.

    ``params`` holds per-method settings keyed by method name, as in a sweep
    config's ``params:`` (e.g. ``{"focal": {"gamma": 2.0}, "knn": {"k": 10}}``);
    only the entries of this cell's head, loss and sampler are used. When a
    name is both a loss and a sampler (``class_balanced``) and the cell uses
    both, each receives the keys it accepts.
    """

    head: str
    loss: Optional[str] = None
    sampler: Optional[str] = None
    seed: int = 0
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass
class CellResult:
    """The outcome of one cell: DESIGN.md's ``decouple head`` object."""

    features: str
    head: str
    loss: Optional[str]
    sampler: Optional[str]
    seed: int
    params: Dict[str, Any]
    fit_seconds: float
    metrics: Dict[str, Dict[str, Any]]
    #: Per-image predictions of every scored split (:mod:`decouple.predictions`),
    #: which the bootstrap intervals of export and recommend resample.
    predictions: Dict[str, SplitPredictions] = field(default_factory=dict, repr=False)
    #: The fitted head itself, when :func:`~decouple.stage_two.fit.fit_cells`
    #: was asked to keep it (``keep_heads``); not part of the JSON result.
    fitted_head: Any = field(default=None, repr=False, compare=False)
    #: The validated :class:`Cell` this is the result of (its settings as
    #: given, which tell apart cells of one method that a sweep varies).
    cell: Optional[Cell] = field(default=None, repr=False, compare=False)

    def to_json(self) -> Dict[str, Any]:
        """The JSON object of DESIGN.md (plain dicts, lists, numbers, strings)."""
        return {
            "features": self.features,
            "head": self.head,
            "loss": self.loss,
            "sampler": self.sampler,
            "seed": self.seed,
            "params": jsonable(self.params),
            "fit_seconds": round(float(self.fit_seconds), 4),
            "metrics": jsonable(self.metrics),
            "predictions": {split: value.to_json() for split, value in self.predictions.items()},
        }


def validate_cell(cell: Cell) -> Cell:
    """Check a cell's names and combination; return it with defaults filled in.

    Unknown names raise UnknownNameError listing the known ones. A head that
    needs no training (ncm, knn) takes no loss or sampler; a trainable head
    without one gets ``"ce"`` and ``"instance"``.
    """
    head_class = HEADS.get(cell.head)
    seed = cell.seed
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0; got {seed!r}")
    if not isinstance(cell.params, Mapping):
        raise ConfigError(f"params must map method names to settings; got {type(cell.params).__name__}")
    for name, settings in cell.params.items():
        if not isinstance(settings, Mapping):
            raise ConfigError(
                f"params.{name} must be a mapping of settings; got {type(settings).__name__}"
            )
    if head_class.trainable:
        loss = LOSSES.check(cell.loss if cell.loss is not None else "ce")
        sampler = SAMPLERS.check(cell.sampler if cell.sampler is not None else "instance")
    else:
        for kind, value in (("loss", cell.loss), ("sampler", cell.sampler)):
            if value is not None:
                raise ConfigError(
                    f"head {cell.head!r} is training-free and takes no {kind}; got {kind} {value!r} "
                    f"(leave it out, or use a trainable head: "
                    f"{', '.join(name for name in HEADS if HEADS.get(name).trainable)})"
                )
        loss = sampler = None
    return replace(cell, loss=loss, sampler=sampler, seed=int(seed))


def _accepts(registry, name: str) -> set:
    return set(registry.parameters(name))


def method_params(cell: Cell) -> Dict[str, Dict[str, Any]]:
    """The settings for a validated cell's head, loss and sampler, as given (no defaults).

    Returns ``{"head": {...}, "loss": {...}, "sampler": {...}}``.
    """
    head_params = dict(cell.params.get(cell.head, {}))
    loss_params = dict(cell.params.get(cell.loss, {})) if cell.loss else {}
    sampler_params = dict(cell.params.get(cell.sampler, {})) if cell.sampler else {}
    if cell.loss is not None and cell.loss == cell.sampler:
        # One entry serves both: each takes the keys it accepts.
        given = dict(cell.params.get(cell.loss, {}))
        loss_keys = _accepts(LOSSES, cell.loss) - {"class_counts"}
        sampler_keys = _accepts(SAMPLERS, cell.sampler) - set(SAMPLER_HOUSEKEEPING)
        unknown = sorted(set(given) - loss_keys - sampler_keys)
        if unknown:
            raise ConfigError(
                f"params.{cell.loss}: neither the loss nor the sampler {cell.loss!r} takes "
                f"{unknown[0]!r}; the loss takes: {', '.join(sorted(loss_keys)) or 'none'}; "
                f"the sampler takes: {', '.join(sorted(sampler_keys)) or 'none'}"
            )
        loss_params = {key: value for key, value in given.items() if key in loss_keys}
        sampler_params = {key: value for key, value in given.items() if key in sampler_keys}
    return {"head": head_params, "loss": loss_params, "sampler": sampler_params}


def freeze_settings(mapping: Mapping[str, Any]) -> Tuple:
    """A hashable, order-free key of a settings mapping."""
    return tuple(sorted((key, repr(value)) for key, value in mapping.items()))
