"""Sweep configs: the YAML schema, checked whole before anything runs, into a
:class:`SweepConfig`.

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
    vary:                           # settings to grid over, keyed by method name: every
      linear:                       # cell of that method runs once per combination
        max_norm: [null, 0.5, 1.0]
        weight_decay: [5.0e-4, 5.0e-3]
    train: {epochs: 30, lr: 0.1}    # TrainConfig fields, e.g. groups: thirds (shot groups)
    db: results.db                  # default results.db

A head that takes no loss or sampler (ncm, knn) runs once per feature file
and seed. The cells of one method that ``vary:`` tells apart are labelled by
their settings in tables (``linear (max_norm=0.5)``), so that ``recommend``
and ``save-model --select val`` choose among them on val.

Stage one, optional (``features:`` may then be left out)::

    stage_one:
      data: ../shared/data/cifar10-jpg.tar.xz   # image folder, CSV manifest or .tar/.tar.gz/.tar.xz
      backbones: [resnetv2_50]      # timm names
      losses: [ce, balanced_softmax]
      samplers: [instance]          # default [instance]
      profiles: [balanced, {imbalance: 100}]   # balanced needs exactly one long-tailed profile
      seed: 0                       # split seed (default 0)
      finetune: {epochs: 10, lr: 0.05, pretrained: true}   # FinetuneConfig fields, and pretrained,
                                    #   img_size, eval_batch_size, dtype, views, check_images, strict
      features_dir: features/study  # default features
      n_max: 500                    # split options: n_max, val_per_class, test_fraction,
      test_per_class: 100           #   and a cap on the test images of each class

Every (backbone, loss, sampler, profile) is one run and one feature file,
``<features_dir>/<backbone>_<loss>[_<sampler>]_<profile>-<key>.h5``, whose
key hashes the run's settings; ``params:`` reaches its loss and sampler.
Its cells carry the tags ``profile``, ``stage_one_loss`` and
``stage_one_sampler``. Paths are relative to the working directory, as
``features:``'s are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from torch import nn

from decouple.errors import ClassCountError, ConfigError, DecoupleError, did_you_mean
from decouple.stage_one.backbones import check_backbone
from decouple.stage_one.extract import ExtractConfig, _check_config, resolve_img_size
from decouple.stage_one.finetune import FinetuneConfig
from decouple.stage_one.splits import SplitOptions
from decouple.stage_two.cells import Cell, method_params, validate_cell
from decouple.stage_two.config import TrainConfig
from decouple.stage_two.heads import HEADS, create_head
from decouple.stage_two.losses import LOSSES, create_loss
from decouple.stage_two.samplers import SAMPLER_HOUSEKEEPING, SAMPLERS
from decouple.study.grid import cell_params, head_takes_loss, loss_sampler_pairs
from decouple.study.yaml_lines import ConfigPlaces, KeyPath, parse_yaml

CONFIG_KEYS = ("features", "grid", "params", "vary", "train", "db", "stage_one")
GRID_KEYS = ("head", "loss", "sampler", "seed")
FEATURE_KEYS = ("path", "name", "backbone", "tags")
DEFAULT_DB = "results.db"
DEFAULT_SAMPLERS = ("instance",)
DEFAULT_SEEDS = (0,)
# Where ``params:`` names a method; a name in two (class_balanced) takes either's settings.
METHOD_REGISTRIES = (LOSSES, SAMPLERS, HEADS)
STAGE_ONE_KEYS = ("data", "backbones", "losses", "samplers", "profiles", "seed", "finetune", "features_dir",
                  "n_max", "val_per_class", "test_fraction", "test_per_class")
#: The split options ``stage_one:`` takes (SplitOptions fields); profiles and seed give the rest.
STAGE_ONE_SPLIT_KEYS = ("n_max", "val_per_class", "test_fraction")
#: ``stage_one.finetune`` keys: the FinetuneConfig fields the grid does not set, and the
#: ExtractConfig settings of the model and its features.
_SET_BY_GRID = ("loss", "loss_params", "sampler", "sampler_params", "seed", "progress")
EXTRACT_KEYS = ("pretrained", "img_size", "eval_batch_size", "dtype", "views", "check_images", "strict")
FINETUNE_KEYS = tuple(
    item.name for item in dataclasses.fields(FinetuneConfig) if item.name not in _SET_BY_GRID
) + EXTRACT_KEYS
# Settings that change how fast a run goes, not what it computes: left out of its key.
_KEYLESS_FINETUNE = ("workers", "eval_batch_size")
BALANCED = "balanced"
DEFAULT_FEATURES_DIR = "features"


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
class TrainingProfile:
    """The training data of a stage-one run: long-tailed on the exponential
    profile of imbalance factor ``imbalance`` (Cao et al., NeurIPS 2019), or
    balanced with that long-tailed profile as its reference (the same val,
    test and test_lt, and its many / medium / few groups)."""

    kind: str  # SplitOptions.train_profile: "long_tailed" or "balanced"
    imbalance: float

    @property
    def tag(self) -> str:
        """The ``profile`` tag of the run's cells: "balanced" or "imbalance 100"."""
        return BALANCED if self.kind == BALANCED else f"imbalance {self.imbalance:g}"

    @property
    def slug(self) -> str:
        """The profile in a file name: "balanced" or "lt100"."""
        return BALANCED if self.kind == BALANCED else f"lt{self.imbalance:g}"

    def to_json(self) -> Dict[str, Any]:
        return {"train_profile": self.kind, "imbalance": self.imbalance}


@dataclass(frozen=True)
class StageOneRun:
    """One stage-one run of a sweep: its settings, resume key and feature file."""

    backbone: str
    loss: str
    sampler: str
    profile: TrainingProfile
    key: str  # sha256 of everything that changes what the run computes
    spec: FeatureSpec  # the feature file it writes, as the stage-two grid sees it

    @property
    def label(self) -> str:
        return f"{self.spec.name} ({self.backbone} / {self.loss} / {self.sampler} / {self.profile.tag})"

    def to_json(self) -> Dict[str, Any]:
        return {"backbone": self.backbone, "loss": self.loss, "sampler": self.sampler,
                "profile": self.profile.tag, **self.profile.to_json()}


@dataclass(frozen=True)
class StageOneConfig:
    """The validated ``stage_one:`` section: the runs' grid and shared settings."""

    data: str
    backbones: Tuple[str, ...]
    losses: Tuple[str, ...]
    samplers: Tuple[str, ...]
    profiles: Tuple[TrainingProfile, ...]
    seed: int = 0
    #: FINETUNE_KEYS given under ``finetune:``.
    finetune: Mapping[str, Any] = field(default_factory=dict)
    #: STAGE_ONE_SPLIT_KEYS given.
    split: Mapping[str, Any] = field(default_factory=dict)
    test_per_class: Optional[int] = None
    features_dir: str = DEFAULT_FEATURES_DIR
    #: The sweep's ``params:``; the part that reaches a run's loss and sampler is its settings.
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def method_settings(self, loss: str, sampler: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """(loss settings, sampler settings) of ``params:`` for one run."""
        settings = cell_params(self.params, "", loss, sampler)
        return dict(settings.get(loss, {})), dict(settings.get(sampler, {}))

    def finetune_config(self, loss: str, sampler: str, **overrides: Any) -> FinetuneConfig:
        """The run's :class:`FinetuneConfig` (not yet resolved)."""
        loss_params, sampler_params = self.method_settings(loss, sampler)
        given = {key: value for key, value in self.finetune.items() if key not in EXTRACT_KEYS}
        if "lr_steps" in given:
            given["lr_steps"] = tuple(given["lr_steps"])
        return FinetuneConfig(**given, loss=loss, sampler=sampler, loss_params=loss_params,
                              sampler_params=sampler_params, seed=self.seed, **overrides)

    def extract_settings(self) -> Dict[str, Any]:
        """The ExtractConfig settings given under ``finetune:`` (pretrained, img_size, ...)."""
        return {key: value for key, value in self.finetune.items() if key in EXTRACT_KEYS}

    def extract_config(self, run: "StageOneRun", data: str, *, device: str = "auto",
                       progress: bool = False) -> ExtractConfig:
        """The :class:`ExtractConfig` of one run: resumable, writing its feature file."""
        return ExtractConfig(
            data=data, backbone=run.backbone, split=self.split_options(run.profile),
            finetune=self.finetune_config(run.loss, run.sampler, progress=progress), out=run.spec.path,
            resume=True, device=device, **self.extract_settings(),
        )

    def split_options(self, profile: TrainingProfile) -> SplitOptions:
        """The run's :class:`SplitOptions`: the profile, the seed and the split settings."""
        return SplitOptions(imbalance=profile.imbalance, train_profile=profile.kind, seed=self.seed, **self.split)

    def runs(self) -> List[StageOneRun]:
        """Every (backbone, loss, sampler, profile) run, in that nesting order."""
        planned = []
        for backbone in self.backbones:
            for loss in self.losses:
                for sampler in self.samplers:
                    for profile in self.profiles:
                        planned.append(self._run(backbone, loss, sampler, profile))
        return planned

    def _run(self, backbone: str, loss: str, sampler: str, profile: TrainingProfile) -> StageOneRun:
        loss_params, sampler_params = self.method_settings(loss, sampler)
        key = sha256_json({
            "data": self.data, "backbone": backbone, "loss": loss, "sampler": sampler,
            "loss_params": loss_params, "sampler_params": sampler_params, "profile": profile.to_json(),
            "seed": self.seed, "split": dict(self.split),
            "finetune": {k: v for k, v in self.finetune.items() if k not in _KEYLESS_FINETUNE},
            **({"test_per_class": self.test_per_class} if self.test_per_class is not None else {}),
        })
        name = "_".join([backbone, loss] + ([sampler] if sampler != DEFAULT_SAMPLERS[0] else []) + [profile.slug])
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        spec = FeatureSpec(
            path=f"{self.features_dir.rstrip('/')}/{name}-{key[:8]}.h5", name=name, backbone=backbone,
            tags={"profile": profile.tag, "stage_one_loss": loss, "stage_one_sampler": sampler},
        )
        return StageOneRun(backbone=backbone, loss=loss, sampler=sampler, profile=profile, key=key, spec=spec)

    def to_json(self) -> Dict[str, Any]:
        return {
            "data": self.data, "backbones": list(self.backbones), "losses": list(self.losses),
            "samplers": list(self.samplers), "profiles": [profile.to_json() for profile in self.profiles],
            "seed": self.seed, "finetune": dict(self.finetune), "split": dict(self.split),
            "test_per_class": self.test_per_class, "features_dir": self.features_dir,
        }


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
    #: ``vary:``: method -> setting -> the values to grid over (each a tuple).
    vary: Mapping[str, Mapping[str, Tuple[Any, ...]]] = field(default_factory=dict)
    source: Optional[str] = None
    # Line of each key path in the config file, for later errors (missing files).
    lines: Mapping[KeyPath, int] = field(default_factory=dict, compare=False, repr=False)
    #: ``stage_one:``, when the sweep makes feature files itself.
    stage_one: Optional[StageOneConfig] = None

    def feature_specs(self) -> Tuple[FeatureSpec, ...]:
        """Every feature file of the stage-two grid: those stage one makes, then ``features:``."""
        made = tuple(run.spec for run in self.stage_one.runs()) if self.stage_one is not None else ()
        return made + self.features

    def to_json(self) -> Dict[str, Any]:
        """The config's content (without ``db`` and ``source``), JSON-ready."""
        return {
            # Only when given, so that a config without it keeps its hash.
            **({"stage_one": self.stage_one.to_json()} if self.stage_one is not None else {}),
            "features": [spec.to_json() for spec in self.features],
            "grid": {
                "head": list(self.heads),
                "loss": list(self.losses),
                "sampler": list(self.samplers),
                "seed": list(self.seeds),
            },
            "params": {name: dict(values) for name, values in self.params.items()},
            "train": dict(self.train),
            # Only when given, so that a config without it keeps its hash.
            **({"vary": {name: {key: list(values) for key, values in settings.items()}
                         for name, settings in self.vary.items()}} if self.vary else {}),
        }

    @property
    def config_hash(self) -> str:
        """sha256 of the config's content; stored with every cell for provenance."""
        return sha256_json(self.to_json())

    def train_config(self, **overrides: Any) -> TrainConfig:
        """The :class:`~decouple.stage_two.config.TrainConfig` of ``train:`` plus ``overrides``."""
        return TrainConfig(**{**dict(self.train), **overrides}).validated()

    def cells(self, specs: Optional[Sequence[FeatureSpec]] = None) -> List[Tuple[FeatureSpec, Cell]]:
        """(feature spec, validated :class:`~decouple.stage_two.cells.Cell`) for every cell
        of the grid on ``specs`` (default :meth:`feature_specs`), in order:
        feature file, seed, head, loss, sampler."""
        planned = []
        for spec in self.feature_specs() if specs is None else specs:
            for seed in self.seeds:
                for head in self.heads:
                    for loss, sampler in loss_sampler_pairs(head, self.losses, self.samplers):
                        for params in self.variants(head, loss, sampler):
                            cell = Cell(head=head, loss=loss, sampler=sampler, seed=seed, params=params)
                            planned.append((spec, validate_cell(cell)))
        return planned

    def variants(self, head: str, loss: Optional[str], sampler: Optional[str]) -> List[Dict[str, Dict[str, Any]]]:
        """The settings of each cell of one (head, loss, sampler): ``params:``
        overlaid with every combination of the ``vary:`` values that reach
        it (:func:`~decouple.study.grid.cell_params`), each once, in the
        order of ``vary:``; a single entry when none does."""
        axes = [(name, key, values) for name, settings in self.vary.items() for key, values in settings.items()]
        combinations = [{}]
        for name, key, values in axes:
            combinations = [{**chosen, (name, key): value} for chosen in combinations for value in values]
        variants: List[Dict[str, Dict[str, Any]]] = []
        for chosen in combinations:
            merged = {name: dict(settings) for name, settings in self.params.items()}
            for (name, key), value in chosen.items():
                merged.setdefault(name, {})[key] = value
            params = cell_params(merged, head, loss, sampler)
            if params not in variants:
                variants.append(params)
        return variants


def sha256_json(value: Any) -> str:
    """sha256 of ``value`` as canonical JSON (sorted keys, no spaces)."""
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


def parse_config(data: Any, *, source: Optional[str] = None, _places: Optional[ConfigPlaces] = None) -> SweepConfig:
    """Validate a config already parsed into Python values (a dict)."""
    places = _places or ConfigPlaces(source)
    if not isinstance(data, Mapping):
        got = "an empty file" if data is None else type(data).__name__
        raise places.error((), f"must be a mapping with keys {', '.join(CONFIG_KEYS)}; got {got}")
    _check_keys(places, (), data, CONFIG_KEYS)
    if "features" not in data and "stage_one" not in data:
        raise places.error((), "missing key 'features' (a list of feature files) or 'stage_one' (runs that make them)")
    if "grid" not in data:
        raise places.error((), "missing key 'grid' (head, loss, sampler, seed lists)")
    features = _parse_features(places, data["features"]) if "features" in data else ()
    heads, losses, samplers, seeds = _parse_grid(places, data["grid"])
    params = _parse_params(places, data.get("params") or {})
    stage_one = _parse_stage_one(places, data["stage_one"], params, features) if "stage_one" in data else None
    vary = _parse_vary(places, data.get("vary") or {}, params, heads + losses + samplers)
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
        vary=vary,
        source=source,
        lines=dict(places.lines),
        stage_one=stage_one,
    )
    check_cells(places, config)
    return config


def _check_keys(places: ConfigPlaces, path: KeyPath, mapping: Mapping, known: Sequence[str], what: str = "key") -> None:
    for key in mapping:
        if key not in known:
            hint = did_you_mean(key, known)
            raise places.error(
                path + (key,), f"unknown {what} {key!r}{hint}; known {what}s: {', '.join(known)}"
            )


def _as_list(places: ConfigPlaces, path: KeyPath, value: Any) -> List[Any]:
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, Mapping):
        raise places.error(path, "must be a list (or a single value); got a mapping")
    return [value]


def _parse_features(places: ConfigPlaces, value: Any) -> Tuple[FeatureSpec, ...]:
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


def _parse_grid(
    places: ConfigPlaces, grid: Any
) -> Tuple[Tuple[str, ...], Tuple[str, ...], Tuple[str, ...], Tuple[int, ...]]:
    """``grid:`` -> (heads, losses, samplers, seeds)."""
    if not isinstance(grid, Mapping):
        raise places.error(("grid",), f"must be a mapping with keys {', '.join(GRID_KEYS)}; got {grid!r}")
    _check_keys(places, ("grid",), grid, GRID_KEYS)
    if "head" not in grid:
        raise places.error(("grid",), f"missing key 'head' (a list of heads: {', '.join(HEADS.names())})")
    heads = _grid_names(places, grid, "head", HEADS)
    if not heads:
        raise places.error(("grid", "head"), "must list at least one head")
    losses = _grid_names(places, grid, "loss", LOSSES)
    samplers = _grid_names(places, grid, "sampler", SAMPLERS, DEFAULT_SAMPLERS)
    trained = [head for head in heads if head_takes_loss(head)]
    if trained and not losses:
        raise places.error(
            ("grid",), f"missing key 'loss': head {trained[0]!r} trains with a loss; "
            f"known losses: {', '.join(LOSSES.names())}"
        )
    if trained and not samplers:
        raise places.error(("grid", "sampler"), f"must list at least one sampler for head {trained[0]!r}")
    return heads, losses, samplers, _grid_seeds(places, grid)


def _grid_names(
    places: ConfigPlaces, grid: Mapping, key: str, registry: Any, default: Sequence[str] = (),
    *, section: KeyPath = ("grid",),
) -> Tuple[str, ...]:
    """The registered method names listed under ``<section>.<key>``, each once."""
    values = _as_list(places, section + (key,), grid.get(key, list(default)))
    seen: List[str] = []
    for index, name in enumerate(values):
        where = section + (key, index)
        if not isinstance(name, str):
            raise places.error(where, f"must be a {registry.kind} name; got {name!r}")
        if name not in registry:
            raise places.error(where, registry.unknown_message(name))
        if name in seen:
            raise places.error(where, f"{name!r} is listed twice")
        seen.append(name)
    return tuple(seen)


def _grid_seeds(places: ConfigPlaces, grid: Mapping) -> Tuple[int, ...]:
    """The non-negative integer seeds under ``grid.seed``, each once."""
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
    return tuple(seeds)


def method_parameters(name: str) -> Dict[str, Any]:
    """Settings ``params: {name: {...}}`` accepts for method ``name`` (a loss,
    sampler or head; a name that is both, like class_balanced, takes either's)."""
    accepted: Dict[str, Any] = {}
    for registry in METHOD_REGISTRIES:
        if name in registry:
            accepted.update(registry.parameters(name))
    # Filled in from the data or by stage two, never by the config.
    for housekeeping in ("class_counts", *SAMPLER_HOUSEKEEPING):
        accepted.pop(housekeeping, None)
    return accepted


def _parse_params(places: ConfigPlaces, params: Any) -> Dict[str, Dict[str, Any]]:
    if not isinstance(params, Mapping):
        raise places.error(("params",), f"must map method names to settings; got {params!r}")
    known = []
    for registry in METHOD_REGISTRIES:
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
            _check_setting(places, where, method, key, accepted)
        parsed[method] = dict(settings)
    return parsed


def _check_setting(places: ConfigPlaces, where: KeyPath, method: str, key: Any, accepted: Mapping[str, Any]) -> None:
    """A setting ``key`` of ``method`` must be one it takes (``accepted``)."""
    if key not in accepted:
        hint = did_you_mean(key, accepted)
        raise places.error(
            where + (key,), f"{method} takes no setting {key!r}{hint}; it takes: {', '.join(accepted) or 'none'}"
        )


def _parse_vary(
    places: ConfigPlaces, vary: Any, params: Mapping[str, Mapping[str, Any]], in_grid: Sequence[str]
) -> Dict[str, Dict[str, Tuple[Any, ...]]]:
    """``vary:`` -> method -> setting -> its values: each method in the grid,
    each setting one it takes and not also fixed in ``params:``, each list of
    values non-empty and without repeats."""
    if not isinstance(vary, Mapping):
        raise places.error(("vary",), f"must map method names to settings and their values; got {vary!r}")
    parsed: Dict[str, Dict[str, Tuple[Any, ...]]] = {}
    for method, settings in vary.items():
        where = ("vary", method)
        if method not in in_grid:
            hint = did_you_mean(method, in_grid)
            raise places.error(
                where, f"{method!r} is not in the grid{hint}; vary a head, loss or sampler of grid: "
                f"{', '.join(dict.fromkeys(in_grid))}"
            )
        if not isinstance(settings, Mapping) or not settings:
            raise places.error(where, f"must map settings to lists of values, e.g. {{max_norm: [0.5, 1.0]}}; "
                                      f"got {settings!r}")
        accepted = method_parameters(method)
        parsed[method] = {}
        for key, values in settings.items():
            _check_setting(places, where, method, key, accepted)
            if key in params.get(method, {}):
                raise places.error(where + (key,), f"{method}.{key} is also set in params:; give it in one place")
            if not isinstance(values, (list, tuple)) or not values:
                raise places.error(where + (key,), f"must be a non-empty list of values to try; got {values!r}")
            texts = [json.dumps(value, sort_keys=True, default=str) for value in values]
            if len(set(texts)) < len(texts):
                raise places.error(where + (key,), f"lists a value twice: {values!r}")
            parsed[method][key] = tuple(values)
    return parsed


def _parse_train(places: ConfigPlaces, train: Any) -> Dict[str, Any]:
    if not isinstance(train, Mapping):
        raise places.error(("train",), f"must be a mapping of training settings; got {train!r}")
    _check_keys(places, ("train",), train, [item.name for item in dataclasses.fields(TrainConfig)],
                what="train setting")
    _check_types(places, ("train",), train, typing.get_type_hints(TrainConfig))
    try:
        TrainConfig(**dict(train)).validated()
    except (TypeError, ValueError) as exc:
        message = str(exc)
        key = next((key for key in train if f" {key} " in f" {message} " or f" {key}:" in message), None)
        raise places.error(("train", key) if key else ("train",), message) from None
    return dict(train)


def _check_types(places: ConfigPlaces, where: KeyPath, values: Mapping[str, Any], hints: Mapping[str, Any]) -> None:
    """Each of ``values`` must have the type its dataclass field's hint names
    (a list for a tuple field, whose items the dataclass checks itself)."""
    for key, value in values.items():
        if typing.get_origin(hints[key]) is tuple:
            if not isinstance(value, (list, tuple, str)):
                raise places.error(where + (key,), f"must be a list; got {value!r}")
            continue
        kinds = typing.get_args(hints[key]) or (hints[key],)  # Optional[int] -> (int, NoneType)
        nullable = type(None) in kinds
        kinds = tuple(kind for kind in kinds if kind is not type(None))
        ok = nullable if value is None else any(_has_kind(value, kind) for kind in kinds)
        if not ok:
            expected = " or ".join(kind.__name__ for kind in kinds) + (" or null" if nullable else "")
            raise places.error(where + (key,), f"must be {expected}; got {value!r}")


def _has_kind(value: Any, kind: type) -> bool:
    """isinstance, where a bool is no number and an int is a float."""
    if kind in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if kind is float else kind)


# --------------------------------------------------------------------------- stage_one:


def _parse_stage_one(
    places: ConfigPlaces, section: Any, params: Mapping[str, Mapping[str, Any]], features: Sequence[FeatureSpec]
) -> StageOneConfig:
    """``stage_one:`` -> :class:`StageOneConfig`, every run's settings built once."""
    where: KeyPath = ("stage_one",)
    if not isinstance(section, Mapping):
        raise places.error(where, f"must be a mapping with keys {', '.join(STAGE_ONE_KEYS)}; got {section!r}")
    _check_keys(places, where, section, STAGE_ONE_KEYS)
    for required in ("data", "backbones", "losses", "profiles"):
        if required not in section:
            raise places.error(where, f"missing key {required!r}")
    for key in ("data", "features_dir"):
        value = section.get(key, DEFAULT_FEATURES_DIR)
        if not isinstance(value, str) or not value.strip():
            raise places.error(where + (key,), f"must be a path; got {value!r}")
    backbones = _as_list(places, where + ("backbones",), section["backbones"])
    for index, backbone in enumerate(backbones):
        _check_backbone_name(places, where + ("backbones", index), backbone, backbones[:index])
    losses = _grid_names(places, section, "losses", LOSSES, section=where)
    samplers = _grid_names(places, section, "samplers", SAMPLERS, DEFAULT_SAMPLERS, section=where)
    if not backbones or not losses or not samplers:
        empty = "backbones" if not backbones else "losses" if not losses else "samplers"
        raise places.error(where + (empty,), "must list at least one")
    seed = section.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise places.error(where + ("seed",), f"must be a non-negative integer; got {seed!r}")
    finetune = section.get("finetune") or {}
    if not isinstance(finetune, Mapping):
        raise places.error(where + ("finetune",), f"must be a mapping of fine-tuning settings; got {finetune!r}")
    _check_keys(places, where + ("finetune",), finetune, FINETUNE_KEYS, what="finetune setting")
    hints = {**typing.get_type_hints(ExtractConfig), **typing.get_type_hints(FinetuneConfig)}
    _check_types(places, where + ("finetune",), finetune, hints)
    split = {key: section[key] for key in STAGE_ONE_SPLIT_KEYS if key in section}
    _check_types(places, where, split, typing.get_type_hints(SplitOptions))
    test_per_class = section.get("test_per_class")
    if test_per_class is not None and (isinstance(test_per_class, bool) or not isinstance(test_per_class, int)
                                       or test_per_class < 1):
        raise places.error(where + ("test_per_class",), f"must be a positive integer; got {test_per_class!r}")
    config = StageOneConfig(
        data=section["data"], backbones=tuple(backbones), losses=losses, samplers=samplers,
        profiles=_parse_profiles(places, section["profiles"]), seed=seed, finetune=dict(finetune), split=split,
        test_per_class=test_per_class, features_dir=section.get("features_dir", DEFAULT_FEATURES_DIR),
        params=params,
    )
    _check_stage_one_settings(places, config)
    taken = {spec.name: index for index, spec in enumerate(features)}
    for run in config.runs():
        if run.spec.name in taken:
            raise places.error(("features", taken[run.spec.name], "name"),
                               f"name {run.spec.name!r} is also a stage-one run's; names must differ")
    return config


def _check_backbone_name(places: ConfigPlaces, where: KeyPath, backbone: Any, earlier: Sequence[Any]) -> None:
    if not isinstance(backbone, str):
        raise places.error(where, f"must be a timm model name; got {backbone!r}")
    try:
        check_backbone(backbone)
    except DecoupleError as exc:
        raise places.error(where, str(exc).replace("--backbone: ", "", 1)) from None
    if backbone in earlier:
        raise places.error(where, f"{backbone!r} is listed twice")


def _parse_profiles(places: ConfigPlaces, value: Any) -> Tuple[TrainingProfile, ...]:
    """``profiles:``: ``balanced`` or ``{imbalance: IF}`` entries, each once;
    ``balanced`` takes the one long-tailed profile as its reference."""
    where: KeyPath = ("stage_one", "profiles")
    entries = _as_list(places, where, value)
    expected = "balanced or a mapping {imbalance: IF} (IF >= 1)"
    imbalances: List[Tuple[int, float]] = []
    balanced_at = []
    for index, entry in enumerate(entries):
        if entry == BALANCED:
            balanced_at.append(index)
            continue
        if not isinstance(entry, Mapping):
            hint = did_you_mean(entry, [BALANCED]) if isinstance(entry, str) else ""
            raise places.error(where + (index,), f"unknown profile {entry!r}{hint}; expected {expected}")
        _check_keys(places, where + (index,), entry, ("imbalance",), what="profile key")
        imbalance = entry.get("imbalance")
        if not _has_kind(imbalance, float) or not imbalance >= 1:
            raise places.error(where + (index, "imbalance"), f"must be a number >= 1; got {imbalance!r}")
        if any(imbalance == earlier for _, earlier in imbalances):
            raise places.error(where + (index,), f"imbalance {imbalance:g} is listed twice")
        imbalances.append((index, float(imbalance)))
    if not entries:
        raise places.error(where, f"must list at least one profile: {expected}")
    if len(balanced_at) > 1:
        raise places.error(where + (balanced_at[1],), "balanced is listed twice")
    if balanced_at and len(imbalances) != 1:
        raise places.error(
            where + (balanced_at[0],), f"balanced needs exactly one long-tailed profile ({{imbalance: IF}}) as its "
            f"reference, whose val, test, test_lt and shot groups it shares; got {len(imbalances)}"
        )
    profiles = {index: TrainingProfile("long_tailed", imbalance) for index, imbalance in imbalances}
    profiles.update({index: TrainingProfile(BALANCED, imbalances[0][1]) for index in balanced_at})
    return tuple(profiles[index] for index in sorted(profiles))


def _check_stage_one_settings(places: ConfigPlaces, config: StageOneConfig) -> None:
    """Build every run's split options and :class:`ExtractConfig` and put it
    through the checks of ``decouple extract`` (:func:`_extract_error`), and
    build its loss, so that a bad value stops the sweep before its first run;
    a per-class setting is judged later, against the data's classes
    (:func:`check_stage_one_counts`)."""
    where: KeyPath = ("stage_one",)
    for profile in config.profiles:
        try:
            config.split_options(profile)
        except (TypeError, ValueError) as exc:
            raise places.error(where + (_option_key(str(exc), config.split) or "profiles",), str(exc)) from None
    for run in config.runs():
        message = _extract_error(config, run)
        if message is not None:
            raise places.error(_finetune_place(config, run, message), message)
    check_stage_one_counts(places, config, np.array([100, 30, 10, 3, 1]))


def _extract_error(config: StageOneConfig, run: StageOneRun) -> Optional[str]:
    """What ``decouple extract`` would refuse in ``run``'s ExtractConfig before
    reading data (its option checks and the resolved fine-tune settings), and
    the input size rule of ``--img-size`` (checked there once the model is
    made; a model without a pretrained config stands in); None when accepted."""
    try:
        extract = config.extract_config(run, config.data)
        _check_config(extract)
        resolve_img_size(extract.img_size, nn.Identity(), None, pretrained=True)
    except (TypeError, ValueError) as exc:
        return str(exc)
    return None


def _finetune_place(config: StageOneConfig, run: StageOneRun, message: str) -> KeyPath:
    """The key path of the ``stage_one.finetune`` setting behind ``message``:
    the one it names, else the one that fails alone; the run's sampler when
    it fails without any (a stage-two sampler)."""
    where: KeyPath = ("stage_one", "finetune")
    key = _option_key(message, config.finetune)
    if key is not None:
        return where + (key,)
    if _extract_error(dataclasses.replace(config, finetune={}), run) is not None:
        return ("stage_one", "samplers", config.samplers.index(run.sampler))
    key = next((key for key, value in config.finetune.items()
                if _extract_error(dataclasses.replace(config, finetune={key: value}), run) is not None), None)
    return where + ((key,) if key is not None else ())


def check_stage_one_counts(
    places: ConfigPlaces, config: StageOneConfig, class_counts: Any, *, data: Optional[str] = None
) -> None:
    """Every stage-one loss, with its settings, must build on training counts
    ``class_counts`` (C,): those of ``data`` once it is read, else made-up
    counts, on which a per-class setting's length is not judged yet."""
    on_data = "" if data is None else f"{data} ({len(class_counts)} classes): "
    for index, loss in enumerate(config.losses):
        for sampler in config.samplers:
            loss_params = config.finetune_config(loss, sampler).resolved().loss_params
            try:
                create_loss(loss, class_counts=np.asarray(class_counts), **loss_params)
            except DecoupleError as exc:
                if isinstance(exc, ClassCountError) and data is None:
                    continue
                place = _setting_place(str(exc), config.params, {}, loss)
                if place == ("grid",):
                    place = ("stage_one", "losses", index)
                raise places.error(place, f"{on_data}stage-one loss {loss}: {exc}") from None


def _option_key(message: str, given: Mapping[str, Any]) -> Optional[str]:
    """The key of ``given`` an option error names, as ``--n-max`` or ``n_max``."""
    return next((key for key in given if f"--{key.replace('_', '-')}" in message or f" {key} " in f" {message} "),
                None)


def check_cells(
    places: ConfigPlaces,
    config: SweepConfig,
    *,
    class_counts: Optional[Any] = None,
    features: Optional[str] = None,
    train: Optional[TrainConfig] = None,
) -> None:
    """Every (head, loss, sampler) combination, with its settings, must be one
    stage two accepts: each is built once here, so that a bad value (a
    negative focal gamma, a beta of 1) stops the sweep before it starts.

    With ``class_counts`` (C,), the training counts of feature file
    ``features``, every setting is checked against that file's classes
    (:func:`~decouple.study.plan.plan_sweep` does this for each file before
    the first cell runs); without, on made-up counts, where a per-class
    setting's length cannot be judged yet and is left to that later check.
    """
    train = train if train is not None else config.train_config()
    counts = np.array([100, 30, 10, 3, 1]) if class_counts is None else np.asarray(class_counts)
    on_file = "" if features is None else f"{features} ({len(counts)} classes): "
    checked = set()
    for head in config.heads:
        for loss, sampler in loss_sampler_pairs(head, config.losses, config.samplers):
            if (head, loss, sampler) in checked:
                continue
            checked.add((head, loss, sampler))
            for params in config.variants(head, loss, sampler):
                try:
                    _check_cell(Cell(head=head, loss=loss, sampler=sampler, seed=0, params=params), counts, train)
                except DecoupleError as exc:
                    if isinstance(exc, ClassCountError) and class_counts is None:
                        continue  # judged against each feature file's classes by plan_sweep
                    raise places.error(
                        _setting_place(str(exc), params, config.vary, loss, sampler, head),
                        f"{on_file}cell {_cell_label(head, loss, sampler)}: {exc}",
                    ) from None


def _check_cell(cell: Cell, class_counts: np.ndarray, train: TrainConfig) -> None:
    """Build one cell's head and let it check its loss and sampler settings."""
    cell = validate_cell(cell)
    settings = method_params(cell)
    head_object = create_head(cell.head, **settings["head"])
    if head_object.trainable:
        head_object.check_settings(cell.loss, cell.sampler, settings, class_counts=class_counts, train=train)


def _cell_label(head: str, loss: Optional[str], sampler: Optional[str]) -> str:
    return "/".join(name for name in (head, loss, sampler) if name)


def _setting_place(message: str, params: Mapping[str, Mapping[str, Any]], vary: Mapping[str, Mapping[str, Any]],
                   *methods: Optional[str]) -> KeyPath:
    """The key path of the setting an error message names: vary.<method>.<key>
    or params.<method>.<key> for the first of ``methods`` whose settings it
    names, else params.<method> of the last with settings, else grid."""
    where: KeyPath = ("grid",)
    for method in methods:
        hit = next((key for key in vary.get(method, {}) if str(key) in message), None)
        if hit is not None:
            return ("vary", method, hit)
        if method in params:
            where = ("params", method)
            hit = next((key for key in params[method] if str(key) in message), None)
            if hit is not None:
                return ("params", method, hit)
    return where


