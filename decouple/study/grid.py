"""The cells of a sweep's grid: which heads train with a loss and sampler,
the settings of ``params:`` that reach one cell, and the training settings
that change what a cell computes."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from decouple.stage_two.heads import HEADS
from decouple.stage_two.losses import LOSSES
from decouple.stage_two.samplers import SAMPLERS

# TrainConfig fields that change what a head that does not train (ncm, knn) computes.
_EVAL_TRAIN_FIELDS = ("many_threshold", "few_threshold", "groups", "views")
# TrainConfig fields that never change the numbers, left out of cell keys.
_KEYLESS_TRAIN_FIELDS = ("device",)
# TrainConfig fields added after results were first stored, with the value
# that computes what those results did: left out of a cell's identity at that
# value (and when absent, as in older records), so that adding the field
# changed no existing cell key or table label.
_ADDED_TRAIN_DEFAULTS = {"groups": "thresholds", "views": []}


def head_takes_loss(head: str) -> bool:
    """Whether head ``head`` is trained with a loss and sampler (its class's
    ``trainable``; ncm and knn are not)."""
    return bool(HEADS.get(head).trainable)


def head_defaults(head: str) -> Dict[str, Any]:
    """The parameters of head ``head`` at their defaults, JSON-like (tuples
    as lists); empty for a head this version does not know."""
    if head not in HEADS:
        return {}
    return {key: list(value) if isinstance(value, tuple) else value for key, value in HEADS.parameters(head).items()}


def loss_sampler_pairs(
    head: str, losses: Sequence[str], samplers: Sequence[str]
) -> List[Tuple[Optional[str], Optional[str]]]:
    """The (loss, sampler) pairs head ``head`` runs with: every pair for a
    trained head, the single (None, None) for one that does not train."""
    if head_takes_loss(head):
        return [(loss, sampler) for loss in losses for sampler in samplers]
    return [(None, None)]


def cell_params(
    params: Mapping[str, Mapping[str, Any]], head: str, loss: Optional[str], sampler: Optional[str]
) -> Dict[str, Dict[str, Any]]:
    """The part of ``params:`` that concerns one cell's head, loss and sampler.

    A name that is both a loss and a sampler (class_balanced) keeps only the
    settings of the role(s) it plays in this cell: ``class_balanced: {beta:
    0.9999}`` reaches the class-balanced loss, not a cell that only samples
    class-balanced (and so does not change that cell's key).
    """
    roles = [(head, HEADS), (loss, LOSSES), (sampler, SAMPLERS)]
    out: Dict[str, Dict[str, Any]] = {}
    for name, values in params.items():
        playing = [registry for role, registry in roles if role == name]
        if not playing:
            continue
        accepted = set()
        for registry in playing:
            accepted |= set(registry.parameters(name))
        kept = {key: value for key, value in values.items() if key in accepted}
        if kept or not values:
            out[name] = kept
    return out


def train_identity(head: str, train: Mapping[str, Any]) -> Dict[str, Any]:
    """The training settings (a TrainConfig as a dict) that change what a cell
    of ``head`` computes: all but the device for a trained head, only the
    shot-group settings for one that does not train (ncm, knn).

    ``groups`` appears only when it is not "thresholds" (the default, and
    the rule of every result stored before the field existed), so default
    settings key a cell exactly as before."""
    if head_takes_loss(head):
        fields = {k: v for k, v in train.items() if k not in _KEYLESS_TRAIN_FIELDS}
    else:
        fields = {k: v for k, v in train.items() if k in _EVAL_TRAIN_FIELDS}
    for name, default in _ADDED_TRAIN_DEFAULTS.items():
        value = fields.get(name, default)
        if (list(value) if isinstance(value, tuple) else value) == default:
            fields.pop(name, None)
    return fields
