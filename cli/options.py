"""Options and printing shared by the stage-two commands (head, sweep, ...).

Nothing here imports torch or faiss, so ``decouple --help`` stays instant.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional

import click

from decouple.errors import ConfigError

#: Metric columns of the readable tables, in order.
TABLE_COLUMNS = ("n", "top1", "top5", "macro_f1", "many", "medium", "few")


def features_option(function: Callable) -> Callable:
    """``--features F.h5``: a decouple-features file (checked by the reader, not by click,
    so every bad file gets the same one-line message)."""
    return click.option(
        "--features",
        "features_path",
        required=True,
        metavar="F.h5",
        help="Feature file written by `decouple extract` (decouple-features v1 HDF5).",
    )(function)


#: decouple.metrics.SHOT_RULES, spelled out so that --help imports no numpy.
SHOT_RULES = ("thresholds", "thirds")


def shot_threshold_options(function: Callable) -> Callable:
    """``--groups`` / ``--many-threshold`` / ``--few-threshold``: the rule of
    the shot groups and the boundaries of the "thresholds" rule."""
    function = click.option(
        "--few-threshold", type=int, default=20, show_default=True,
        help="Few-shot classes have fewer training images than this (--groups thresholds).",
    )(function)
    function = click.option(
        "--many-threshold", type=int, default=100, show_default=True,
        help="Many-shot classes have more training images than this (--groups thresholds).",
    )(function)
    return click.option(
        "--groups", "groups", type=click.Choice(SHOT_RULES), default=SHOT_RULES[0], show_default=True,
        help="Shot groups: by --many-threshold / --few-threshold, or thirds of the classes ranked by "
             "training count (many the top third, few the bottom third; for data such as CIFAR-10-LT "
             "where the thresholds leave a group empty).",
    )(function)


def format_value(value: Any) -> str:
    """A metric as table text: fractions with 3 decimals, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def metrics_table(metrics: Mapping[str, Mapping[str, Any]], columns: Iterable[str] = TABLE_COLUMNS) -> str:
    """One row per split, one column per metric, aligned."""
    columns = list(columns)
    rows = [["split"] + columns]
    for split, values in metrics.items():
        rows.append([split] + [format_value(values.get(column)) for column in columns])
    widths = [max(len(row[index]) for row in rows) for index in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def describe_result(result: Mapping[str, Any], *, shot_groups: Optional[str] = None) -> str:
    """A readable summary of one ``decouple head`` result object (DESIGN.md),
    with ``shot_groups`` (the rule of the groups, in words) under the table."""
    params = result.get("params", {})
    chosen = []
    if "epoch" in params:
        chosen.append(f"epoch {params['epoch']}")
    if "tau" in params:
        chosen.append(f"tau {params['tau']:g}")
    selected = f" ({', '.join(chosen)} chosen on {params.get('selected_on')})" if chosen else ""
    title = (
        f"{result['head']} head, loss {result['loss'] or '-'}, sampler {result['sampler'] or '-'}, "
        f"seed {result['seed']}: fit in {result['fit_seconds']:.2f} s{selected}"
    )
    text = f"{result['features']}\n{title}\n{metrics_table(result['metrics'])}"
    return text + (f"\nshot groups: {shot_groups}" if shot_groups else "")


def method_settings(given: Iterable[str], methods: Iterable[str]) -> Dict[str, Dict[str, Any]]:
    """``--param METHOD.KEY=VALUE`` options -> {method: {key: value}}, as a
    sweep config's ``params:``; VALUE is a number where it reads as one
    (5e-3), else YAML (null, true, [0.5, 1]).
    METHOD must be one of ``methods`` (the cell's head, loss and sampler)."""
    import yaml

    from decouple.study.config import method_parameters

    methods = [method for method in methods if method]
    settings: Dict[str, Dict[str, Any]] = {}
    for text in given:
        name, equals, value = text.partition("=")
        method, dot, key = name.partition(".")
        if not equals or not dot or not method or not key:
            raise click.BadParameter(f"{text!r}: expected METHOD.KEY=VALUE, e.g. linear.max_norm=1.0",
                                     param_hint="--param")
        if method not in methods:
            raise click.BadParameter(f"{text!r}: {method!r} is not this cell's head, loss or sampler "
                                     f"({', '.join(methods)})", param_hint="--param")
        accepted = method_parameters(method)
        if key not in accepted:
            raise click.BadParameter(f"{text!r}: {method} takes no setting {key!r}; it takes: "
                                     f"{', '.join(accepted) or 'none'}", param_hint="--param")
        number = _number(value)
        try:
            settings.setdefault(method, {})[key] = number if number is not None else yaml.safe_load(value)
        except yaml.YAMLError:
            raise click.BadParameter(f"{text!r}: the value is not valid YAML", param_hint="--param") from None
    return settings


def _number(text: str) -> Optional[float]:
    """``text`` as an int or float where it is one (5e-3 too, which YAML 1.1 reads as a string), else None."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return None


def check_output_path(path: Optional[str]) -> None:
    """Fail before any work if ``--output`` cannot be appended to."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"{target}: --output is a folder; expected a .jsonl file to append to")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"{target}: --output folder {parent} does not exist")


def append_json_line(path: str, record: Dict[str, Any]) -> None:
    """Append ``record`` as one JSON line, written in a single call so a crash
    leaves either the whole line or none of it."""
    line = json.dumps(record, sort_keys=False) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)
