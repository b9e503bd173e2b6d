"""Sweeps: a YAML grid of heads x losses x samplers x seeds over feature files,
run once, resumably, into a :class:`~decouple.study.results.ResultStore`.

Config (DESIGN.md "Sweep config"; every key is checked, an unknown one is an
error naming its place in the file)::

    features:                       # one or more feature files, paths relative to the
      - features/cifar10_lt.h5      # working directory; a plain path, or a mapping:
      - path: features/vit_lt.h5
        name: vit_lt                #   label in tables (default: the file stem)
        backbone: vit_base_patch16_224   # default: the file's backbone attribute
        tags: {train_data: long_tailed}  # free labels, stored with every cell
    grid:                           # the product of these lists (a single value is a list of one)
      head: [linear, tau_norm, ncm] # required
      loss: [ce, balanced_softmax]  # required when a head trains with a loss
      sampler: [instance]           # default [instance]
      seed: [0, 1, 2]               # default [0]
    params:                         # per-method settings, keyed by method name
      focal: {gamma: 2.0}
    train: {epochs: 30, lr: 0.1}    # TrainConfig fields
    db: results.db                  # default results.db

A head that takes no loss or sampler (ncm, knn) runs once per feature file
and seed. Each cell is identified by a key hashing the feature file (path as
given and content sha256), head, loss, sampler, seed, the cell's resolved
params and the train settings (not the device), so a changed setting never
reuses an old result and a rerun skips exactly the finished cells.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from decouple.errors import ConfigError, DecoupleError, FeatureFileError, did_you_mean
from decouple.provenance import file_sha256, jsonable, package_versions, utc_now

CONFIG_KEYS = ("features", "grid", "params", "train", "db")
GRID_KEYS = ("head", "loss", "sampler", "seed")
FEATURE_KEYS = ("path", "name", "backbone", "tags")
DEFAULT_DB = "results.db"
DEFAULT_SAMPLERS = ("instance",)
DEFAULT_SEEDS = (0,)
# TrainConfig fields that change what a head that does not train (ncm, knn) computes.
_EVAL_TRAIN_FIELDS = ("many_threshold", "few_threshold")
# TrainConfig fields that never change the numbers, left out of cell keys.
_KEYLESS_TRAIN_FIELDS = ("device",)

KeyPath = Tuple[Union[str, int], ...]


# ---------------------------------------------------------------------------
# Locating keys in the YAML text, for error messages.
# ---------------------------------------------------------------------------


def format_key_path(path: KeyPath) -> str:
    """("grid", "loss", 2) -> "grid.loss[2]"."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"


class _Places:
    """Where each key path sits in the config text, and the errors that cite it."""

    def __init__(self, source: Optional[str], lines: Optional[Dict[KeyPath, int]] = None) -> None:
        self.source = source
        self.lines = lines or {}

    def error(self, path: KeyPath, message: str, cls: type = ConfigError) -> DecoupleError:
        where = self.source or "sweep config"
        line = None
        for end in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                break
        location = f"{where}, line {line}" if line is not None else where
        return cls(f"{location}: {format_key_path(path)}: {message}")


def _node_lines(node: Any, path: KeyPath, lines: Dict[KeyPath, int], duplicates: List[KeyPath]) -> None:
    import yaml

    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node)
            if key in seen:
                duplicates.append(path + (key,))
                lines[path + (key,)] = key_node.start_mark.line + 1
                continue
            seen.add(key)
            lines[path + (key,)] = key_node.start_mark.line + 1
            _node_lines(value_node, path + (key,), lines, duplicates)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _node_lines(item, path + (index,), lines, duplicates)


def parse_yaml(text: str, *, source: str) -> Tuple[Any, _Places]:
    """YAML text -> (data, places); a syntax error names the file, line and column."""
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark else source
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    lines: Dict[KeyPath, int] = {}
    duplicates: List[KeyPath] = []
    if node is not None:
        _node_lines(node, (), lines, duplicates)
    places = _Places(source, lines)
    if duplicates:
        raise places.error(duplicates[0], "key given twice; each key may appear once")
    return data, places


# ---------------------------------------------------------------------------
# The validated config.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureSpec:
    """One feature file of a sweep: its path as given, a label and free tags."""

    path: str
    name: str
    backbone: Optional[str] = None
    tags: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        return {"path": self.path, "name": self.name, "backbone": self.backbone, "tags": dict(self.tags)}


@dataclass(frozen=True)
class SweepConfig:
    """A validated sweep config; build it with :func:`load_config` or :func:`parse_config`."""

    features: Tuple[FeatureSpec, ...]
    heads: Tuple[str, ...]
    losses: Tuple[str, ...]
    samplers: Tuple[str, ...]
    seeds: Tuple[int, ...]
    params: Mapping[str, Mapping[str, Any]]
    train: Mapping[str, Any]
    db: str = DEFAULT_DB
    source: Optional[str] = None
    # Line of each key path in the config file, for later errors (missing files).
    lines: Mapping[KeyPath, int] = field(default_factory=dict, compare=False, repr=False)

    def to_json(self) -> Dict[str, Any]:
        """The config's content (without ``db`` and ``source``), JSON-ready."""
        return {
            "features": [spec.to_json() for spec in self.features],
            "grid": {
                "head": list(self.heads),
                "loss": list(self.losses),
                "sampler": list(self.samplers),
                "seed": list(self.seeds),
            },
            "params": {name: dict(values) for name, values in self.params.items()},
            "train": dict(self.train),
        }

    @property
    def config_hash(self) -> str:
        """sha256 of the config's content; stored with every cell for provenance."""
        return _sha256_json(self.to_json())

    def train_config(self, **overrides: Any):
        """The :class:`~decouple.stage_two.fit.TrainConfig` of ``train:`` plus ``overrides``."""
        from decouple.stage_two.fit import TrainConfig

        return TrainConfig(**{**dict(self.train), **overrides}).validated()

    def cells(self) -> List[Tuple[FeatureSpec, Any]]:
        """(feature spec, validated :class:`~decouple.stage_two.fit.Cell`) for every cell
        of the grid, in order: feature file, seed, head, loss, sampler."""
        from decouple.stage_two.fit import Cell, validate_cell

        planned = []
        for spec in self.features:
            for seed in self.seeds:
                for head in self.heads:
                    if head_takes_loss(head):
                        combos = [(loss, sampler) for loss in self.losses for sampler in self.samplers]
                    else:
                        combos = [(None, None)]
                    for loss, sampler in combos:
                        cell = Cell(
                            head=head,
                            loss=loss,
                            sampler=sampler,
                            seed=seed,
                            params=cell_params(self.params, head, loss, sampler),
                        )
                        planned.append((spec, validate_cell(cell)))
        return planned


def head_takes_loss(head: str) -> bool:
    """Whether head ``head`` is trained with a loss and sampler (its class's
    ``trainable``; ncm and knn are not)."""
    from decouple.stage_two.heads import HEADS

    return bool(HEADS.get(head).trainable)


def cell_params(
    params: Mapping[str, Mapping[str, Any]], head: str, loss: Optional[str], sampler: Optional[str]
) -> Dict[str, Dict[str, Any]]:
    """The part of ``params:`` that concerns one cell's head, loss and sampler.

    A name that is both a loss and a sampler (class_balanced) keeps only the
    settings of the role(s) it plays in this cell: ``class_balanced: {beta:
    0.9999}`` reaches the class-balanced loss, not a cell that only samples
    class-balanced (and so does not change that cell's key).
    """
    from decouple.stage_two.heads import HEADS
    from decouple.stage_two.losses import LOSSES
    from decouple.stage_two.samplers import SAMPLERS

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


def _sha256_json(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_config(path: Union[str, "os.PathLike[str]"]) -> SweepConfig:
    """Read and validate a sweep config file; errors name the file, line and key."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such sweep config")
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; expected a YAML sweep config")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc})") from None
    data, places = parse_yaml(text, source=str(path))
    return parse_config(data, source=str(path), _places=places)


def parse_config(data: Any, *, source: Optional[str] = None, _places: Optional[_Places] = None) -> SweepConfig:
    """Validate a config already parsed into Python values (a dict)."""
    places = _places or _Places(source)
    if not isinstance(data, Mapping):
        got = "an empty file" if data is None else type(data).__name__
        raise places.error((), f"must be a mapping with keys {', '.join(CONFIG_KEYS)}; got {got}")
    _check_keys(places, (), data, CONFIG_KEYS)
    if "features" not in data:
        raise places.error((), "missing key 'features' (a list of feature files)")
    if "grid" not in data:
        raise places.error((), "missing key 'grid' (head, loss, sampler, seed lists)")
    features = _parse_features(places, data["features"])
    heads, losses, samplers, seeds = _parse_grid(places, data["grid"])
    params = _parse_params(places, data.get("params") or {})
    train = _parse_train(places, data.get("train") or {})
    db = data.get("db", DEFAULT_DB)
    if not isinstance(db, str) or not db.strip():
        raise places.error(("db",), f"must be a file path; got {db!r}")
    config = SweepConfig(
        features=features,
        heads=heads,
        losses=losses,
        samplers=samplers,
        seeds=seeds,
        params=params,
        train=train,
        db=db,
        source=source,
        lines=dict(places.lines),
    )
    _check_cells(places, config)
    return config


def _check_keys(places: _Places, path: KeyPath, mapping: Mapping, known: Sequence[str], what: str = "key") -> None:
    for key in mapping:
        if key not in known:
            hint = did_you_mean(key, known)
            raise places.error(
                path + (key,), f"unknown {what} {key!r}{hint}; known {what}s: {', '.join(known)}"
            )


def _as_list(places: _Places, path: KeyPath, value: Any) -> List[Any]:
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, Mapping):
        raise places.error(path, "must be a list (or a single value); got a mapping")
    return [value]


def _parse_features(places: _Places, value: Any) -> Tuple[FeatureSpec, ...]:
    entries = _as_list(places, ("features",), value)
    if not entries:
        raise places.error(("features",), "must list at least one feature file")
    specs: List[FeatureSpec] = []
    for index, entry in enumerate(entries):
        where = ("features", index)
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, Mapping):
            raise places.error(where, f"must be a path or a mapping with keys {', '.join(FEATURE_KEYS)}; got {entry!r}")
        _check_keys(places, where, entry, FEATURE_KEYS)
        path = entry.get("path")
        if not isinstance(path, str) or not path.strip():
            raise places.error(where + ("path",), f"must be a feature file path; got {path!r}")
        name = entry.get("name", Path(path).stem)
        if not isinstance(name, str) or not name.strip():
            raise places.error(where + ("name",), f"must be a non-empty string; got {name!r}")
        backbone = entry.get("backbone")
        if backbone is not None and not isinstance(backbone, str):
            raise places.error(where + ("backbone",), f"must be a string; got {backbone!r}")
        tags = entry.get("tags") or {}
        if not isinstance(tags, Mapping):
            raise places.error(where + ("tags",), f"must be a mapping of labels; got {tags!r}")
        for key, tag in tags.items():
            if not isinstance(tag, (str, int, float, bool)) or not isinstance(key, str):
                raise places.error(where + ("tags", key), f"must be a string or number; got {tag!r}")
        for earlier in specs:
            if earlier.path == path:
                raise places.error(where + ("path",), f"{path!r} is listed twice")
            if earlier.name == name:
                raise places.error(
                    where + ("name",), f"name {name!r} is already used by {earlier.path!r}; names must differ"
                )
        specs.append(FeatureSpec(path=path, name=name, backbone=backbone, tags=dict(tags)))
    return tuple(specs)


def _parse_grid(places: _Places, grid: Any):
    from decouple.stage_two.heads import HEADS
    from decouple.stage_two.losses import LOSSES
    from decouple.stage_two.samplers import SAMPLERS

    if not isinstance(grid, Mapping):
        raise places.error(("grid",), f"must be a mapping with keys {', '.join(GRID_KEYS)}; got {grid!r}")
    _check_keys(places, ("grid",), grid, GRID_KEYS)
    if "head" not in grid:
        raise places.error(("grid",), f"missing key 'head' (a list of heads: {', '.join(HEADS.names())})")

    def names(key: str, registry, default: Sequence[str] = ()) -> Tuple[str, ...]:
        values = _as_list(places, ("grid", key), grid.get(key, list(default)))
        seen: List[str] = []
        for index, name in enumerate(values):
            where = ("grid", key, index)
            if not isinstance(name, str):
                raise places.error(where, f"must be a {registry.kind} name; got {name!r}")
            if name not in registry:
                raise places.error(where, _unknown_name(registry, name))
            if name in seen:
                raise places.error(where, f"{name!r} is listed twice")
            seen.append(name)
        return tuple(seen)

    heads = names("head", HEADS)
    if not heads:
        raise places.error(("grid", "head"), "must list at least one head")
    losses = names("loss", LOSSES)
    samplers = names("sampler", SAMPLERS, DEFAULT_SAMPLERS)
    trained = [head for head in heads if head_takes_loss(head)]
    if trained and not losses:
        raise places.error(
            ("grid",), f"missing key 'loss': head {trained[0]!r} trains with a loss; "
            f"known losses: {', '.join(LOSSES.names())}"
        )
    if trained and not samplers:
        raise places.error(("grid", "sampler"), f"must list at least one sampler for head {trained[0]!r}")
    seeds_raw = _as_list(places, ("grid", "seed"), grid.get("seed", list(DEFAULT_SEEDS)))
    if not seeds_raw:
        raise places.error(("grid", "seed"), "must list at least one seed")
    seeds: List[int] = []
    for index, seed in enumerate(seeds_raw):
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise places.error(("grid", "seed", index), f"must be a non-negative integer; got {seed!r}")
        if seed in seeds:
            raise places.error(("grid", "seed", index), f"{seed} is listed twice")
        seeds.append(seed)
    return heads, losses, samplers, tuple(seeds)


def _unknown_name(registry, name: str) -> str:
    known = registry.names()
    hint = did_you_mean(name, known)
    plural = registry.plural
    if plural.endswith("ss"):  # Registry("loss") without plural="losses"
        plural = registry.kind + "es"
    return f"unknown {registry.kind} {name!r}{hint}; known {plural}: {', '.join(known)}"


def _method_registries():
    from decouple.stage_two.heads import HEADS
    from decouple.stage_two.losses import LOSSES
    from decouple.stage_two.samplers import SAMPLERS

    return (LOSSES, SAMPLERS, HEADS)


def method_parameters(name: str) -> Dict[str, Any]:
    """Settings ``params: {name: {...}}`` accepts for method ``name`` (a loss,
    sampler or head; a name that is both, like class_balanced, takes either's)."""
    accepted: Dict[str, Any] = {}
    for registry in _method_registries():
        if name in registry:
            accepted.update(registry.parameters(name))
    # Filled in from the data or by stage two, never by the config.
    for housekeeping in ("class_counts", "labels", "total_epochs", "seed", "num_samples", "num_classes"):
        accepted.pop(housekeeping, None)
    return accepted


def _parse_params(places: _Places, params: Any) -> Dict[str, Dict[str, Any]]:
    if not isinstance(params, Mapping):
        raise places.error(("params",), f"must map method names to settings; got {params!r}")
    registries = _method_registries()
    known = []
    for registry in registries:
        known.extend(name for name in registry.names() if name not in known)
    parsed: Dict[str, Dict[str, Any]] = {}
    for method, settings in params.items():
        where = ("params", method)
        if method not in known:
            hint = did_you_mean(method, known)
            raise places.error(
                where, f"unknown method {method!r}{hint}; known losses, samplers and heads: {', '.join(known)}"
            )
        if settings is None:
            settings = {}
        if not isinstance(settings, Mapping):
            raise places.error(where, f"must be a mapping of settings, e.g. {{gamma: 2.0}}; got {settings!r}")
        accepted = method_parameters(method)
        for key in settings:
            if key not in accepted:
                hint = did_you_mean(key, accepted)
                raise places.error(
                    where + (key,),
                    f"{method} takes no setting {key!r}{hint}; it takes: {', '.join(accepted) or 'none'}",
                )
        parsed[method] = dict(settings)
    return parsed


def _parse_train(places: _Places, train: Any) -> Dict[str, Any]:
    from decouple.stage_two.fit import TrainConfig

    if not isinstance(train, Mapping):
        raise places.error(("train",), f"must be a mapping of training settings; got {train!r}")
    hints = typing.get_type_hints(TrainConfig)
    _check_keys(places, ("train",), train, [item.name for item in dataclasses.fields(TrainConfig)],
                what="train setting")
    for key, value in train.items():
        kinds = typing.get_args(hints[key]) or (hints[key],)  # Optional[int] -> (int, NoneType)
        kind = next(kind for kind in kinds if kind is not type(None))
        if value is None:
            ok = type(None) in kinds
        elif kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, kind)
        if not ok:
            expected = kind.__name__ + (" or null" if type(None) in kinds else "")
            raise places.error(("train", key), f"must be {expected}; got {value!r}")
    try:
        TrainConfig(**dict(train)).validated()
    except (TypeError, ValueError) as exc:
        message = str(exc)
        key = next((key for key in train if f" {key} " in f" {message} "), None)
        raise places.error(("train", key) if key else ("train",), message) from None
    return dict(train)


def _check_cells(
    places: _Places,
    config: SweepConfig,
    *,
    class_counts: Optional[Any] = None,
    features: Optional[str] = None,
    train: Optional[Any] = None,
) -> None:
    """Every (head, loss, sampler) combination, with its settings, must be one
    stage two accepts: each is built once here, so that a bad value (a
    negative focal gamma, a beta of 1) stops the sweep before it starts.

    With ``class_counts`` (C,), the training counts of feature file
    ``features``, every setting is checked against that file's classes
    (:func:`plan_sweep` does this for each file before the first cell runs);
    without, on made-up counts, where a per-class setting's length cannot be
    judged yet and is left to that later check.
    """
    import numpy as np

    from decouple.errors import ClassCountError
    from decouple.stage_two.heads import create_head
    from decouple.stage_two.fit import Cell, method_params, validate_cell

    train = train if train is not None else config.train_config()
    counts = np.array([100, 30, 10, 3, 1]) if class_counts is None else np.asarray(class_counts)
    on_file = "" if features is None else f"{features} ({len(counts)} classes): "
    checked = set()
    for head in config.heads:
        combos = (
            [(loss, sampler) for loss in config.losses for sampler in config.samplers]
            if head_takes_loss(head)
            else [(None, None)]
        )
        for loss, sampler in combos:
            if (head, loss, sampler) in checked:
                continue
            checked.add((head, loss, sampler))
            params = cell_params(config.params, head, loss, sampler)
            try:
                cell = validate_cell(Cell(head=head, loss=loss, sampler=sampler, seed=0, params=params))
                settings = method_params(cell)
                head_object = create_head(cell.head, **settings["head"])
                if head_object.trainable:
                    head_object.check_settings(
                        cell.loss, cell.sampler, settings, class_counts=counts, train=train
                    )
            except DecoupleError as exc:
                if isinstance(exc, ClassCountError) and class_counts is None:
                    continue  # judged against each feature file's classes by plan_sweep
                raise places.error(
                    _setting_place(str(exc), params, loss, sampler, head),
                    f"{on_file}cell {_cell_label(head, loss, sampler)}: {exc}",
                ) from None


def _cell_label(head: str, loss: Optional[str], sampler: Optional[str]) -> str:
    return "/".join(name for name in (head, loss, sampler) if name)


def _setting_place(message: str, params: Mapping[str, Mapping[str, Any]], *methods: Optional[str]) -> KeyPath:
    """The key path of the setting an error message names: params.<method>.<key>
    for the first of ``methods`` whose settings it names, else params.<method>
    of the last with settings, else grid."""
    where: KeyPath = ("grid",)
    for method in methods:
        if method in params:
            where = ("params", method)
            hit = next((key for key in params[method] if str(key) in message), None)
            if hit is not None:
                return ("params", method, hit)
    return where


# ---------------------------------------------------------------------------
# Planning: which cells exist, which are finished.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedCell:
    """One cell of a sweep with its resume key."""

    spec: FeatureSpec
    cell: Any  # stage_two.Cell, validated
    key: str

    @property
    def identity(self) -> Tuple[str, str, Optional[str], Optional[str], int]:
        return (self.spec.path, self.cell.head, self.cell.loss, self.cell.sampler, self.cell.seed)

    @property
    def label(self) -> str:
        parts = [self.spec.name, self.cell.head, self.cell.loss, self.cell.sampler, f"seed {self.cell.seed}"]
        return " / ".join(part for part in parts if part)


@dataclass
class SweepPlan:
    """Every cell of a sweep, which of them the database already holds, and
    the settings they are trained with."""

    config: SweepConfig
    db: str
    train: Any  # stage_two.TrainConfig
    cells: List[PlannedCell]
    finished: List[PlannedCell]
    pending: List[PlannedCell]
    feature_sha256: Dict[str, str]


def train_identity(head: str, train: Mapping[str, Any]) -> Dict[str, Any]:
    """The training settings (a TrainConfig as a dict) that change what a cell
    of ``head`` computes: all but the device for a trained head, only the
    shot-group thresholds for one that does not train (ncm, knn)."""
    if head_takes_loss(head):
        return {k: v for k, v in train.items() if k not in _KEYLESS_TRAIN_FIELDS}
    return {k: v for k, v in train.items() if k in _EVAL_TRAIN_FIELDS}


def cell_key(cell: Any, spec: FeatureSpec, features_sha256: str, train: Any) -> str:
    """The resume key of one cell: what it computes, nothing about how fast."""
    train_fields = train_identity(cell.head, dataclasses.asdict(train))
    return _sha256_json(
        {
            "features": spec.path,
            "features_sha256": features_sha256,
            "head": cell.head,
            "loss": cell.loss,
            "sampler": cell.sampler,
            "seed": cell.seed,
            "params": {name: dict(values) for name, values in dict(cell.params).items()},
            "train": train_fields,
        }
    )


def check_feature_files(config: SweepConfig) -> None:
    """Every feature file must exist before the first cell runs."""
    places = _Places(config.source, dict(config.lines))
    for index, spec in enumerate(config.features):
        path = Path(spec.path)
        if not path.exists():
            raise places.error(
                ("features", index), f"{spec.path}: no such feature file (make it with `decouple extract`)",
                FeatureFileError,
            )
        if not path.is_file():
            raise places.error(("features", index), f"{spec.path}: is not a file", FeatureFileError)


def plan_sweep(config: SweepConfig, *, db: Optional[str] = None, train_overrides: Optional[Mapping[str, Any]] = None) -> SweepPlan:
    """Check the feature files, key every cell and look up the finished ones."""
    from decouple.features import read_train_counts
    from decouple.study.results import ResultStore

    check_feature_files(config)
    train = config.train_config(**dict(train_overrides or {}))
    places = _Places(config.source, dict(config.lines))
    for spec in config.features:
        _check_cells(places, config, class_counts=read_train_counts(spec.path), features=spec.path, train=train)
    db_path = db or config.db
    hashes = {spec.path: file_sha256(spec.path) for spec in config.features}
    cells = [
        PlannedCell(spec=spec, cell=cell, key=cell_key(cell, spec, hashes[spec.path], train))
        for spec, cell in config.cells()
    ]
    finished_keys = set()
    if Path(db_path).exists():
        with ResultStore.open_existing(db_path) as store:
            finished_keys = store.finished_keys()
    finished = [planned for planned in cells if planned.key in finished_keys]
    pending = [planned for planned in cells if planned.key not in finished_keys]
    return SweepPlan(
        config=config, db=db_path, train=train, cells=cells, finished=finished, pending=pending,
        feature_sha256=hashes,
    )


# ---------------------------------------------------------------------------
# Running.
# ---------------------------------------------------------------------------


class SweepInterrupted(Exception):
    """Ctrl-C during a sweep: finished cells are stored; a rerun resumes."""

    def __init__(self, done: int, total: int, db: str) -> None:
        self.done, self.total, self.db = done, total, db
        super().__init__(
            f"interrupted: {done} of {total} cells are stored in {db}; "
            f"rerun the same command to run the other {total - done}"
        )


@dataclass
class SweepSummary:
    """What a sweep did: cells in the grid, skipped as finished, run now."""

    db: str
    total: int
    skipped: int
    ran: int
    seconds: float

    def __str__(self) -> str:
        return (
            f"{self.total} cells: {self.ran} run in {self.seconds:.1f} s, "
            f"{self.skipped} already in {self.db}"
        )


def run_sweep(
    config: Union[SweepConfig, str, "os.PathLike[str]"],
    *,
    db: Optional[str] = None,
    train_overrides: Optional[Mapping[str, Any]] = None,
    fuse: bool = True,
    progress: bool = False,
    on_result: Optional[Callable[[Any], None]] = None,
) -> SweepSummary:
    """Run every cell of ``config`` not yet in the database; returns a summary.

    Cells of one feature file go to :func:`~decouple.stage_two.fit.fit_cells`
    together, which fuses those sharing a sampler and seed into one pass over
    the features (``fuse=False`` runs them one at a time, for benchmarks).
    Each result is written in its own transaction the moment it arrives, so
    an interruption loses only the pass in flight. Ctrl-C raises
    :class:`SweepInterrupted` after the finished cells are safe.
    ``on_result(record)`` is called with each stored
    :class:`~decouple.study.results.CellRecord`.
    """
    from decouple.features import read_features
    from decouple.study.results import CellRecord, ResultStore
    from decouple.stage_two.fit import fit_cells

    if not isinstance(config, SweepConfig):
        config = load_config(config)
    start = time.perf_counter()
    plan = plan_sweep(config, db=db, train_overrides=train_overrides)
    total = len(plan.cells)
    versions = package_versions()
    config_hash = config.config_hash
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=len(plan.finished), unit="cell", desc="sweep", dynamic_ncols=True)
    ran = 0
    store = ResultStore(plan.db)
    try:
        for spec in config.features:
            pending = [planned for planned in plan.pending if planned.spec.path == spec.path]
            if not pending:
                continue
            feature_set = read_features(spec.path)
            backbone = spec.backbone or feature_set.backbone
            class_names = list(feature_set.class_names)
            train_counts = [int(count) for count in feature_set.train_counts]
            by_identity = {planned.identity[1:]: planned for planned in pending}
            pass_start = [time.perf_counter()]

            def store_result(result: Any) -> None:
                nonlocal ran
                identity = (result.head, result.loss, result.sampler, int(result.seed))
                planned = by_identity.pop(identity)
                record = CellRecord(
                    cell_key=planned.key,
                    config_hash=config_hash,
                    features=spec.path,
                    features_name=spec.name,
                    features_sha256=plan.feature_sha256[spec.path],
                    backbone=backbone,
                    tags=dict(spec.tags),
                    head=result.head,
                    loss=result.loss,
                    sampler=result.sampler,
                    seed=int(result.seed),
                    params=jsonable(result.params),
                    train=jsonable(dataclasses.asdict(plan.train)),
                    class_names=class_names,
                    train_counts=train_counts,
                    metrics=jsonable(result.metrics),
                    fit_seconds=float(result.fit_seconds),
                    versions=versions,
                    wall_seconds=time.perf_counter() - pass_start[0],
                    finished_at=utc_now(),
                )
                if store.insert(record):
                    ran += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(planned.label, refresh=False)
                if on_result is not None:
                    on_result(record)

            groups = [pending] if fuse else [[planned] for planned in pending]
            for group in groups:
                pass_start[0] = time.perf_counter()
                fit_cells(feature_set, [planned.cell for planned in group], train=plan.train, on_result=store_result)
            missing = [planned.label for planned in by_identity.values()]
            if missing:
                raise DecoupleError(f"stage two returned no result for {len(missing)} cells, e.g. {missing[0]}")
    except KeyboardInterrupt:
        done = sum(1 for key in store.finished_keys() if key in {planned.key for planned in plan.cells})
        raise SweepInterrupted(done, total, plan.db) from None
    finally:
        if bar is not None:
            bar.close()
        store.close()
    return SweepSummary(
        db=plan.db, total=total, skipped=len(plan.finished), ran=ran, seconds=time.perf_counter() - start
    )
