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


def shot_threshold_options(function: Callable) -> Callable:
    """``--many-threshold`` / ``--few-threshold``: the shot-group boundaries."""
    function = click.option(
        "--few-threshold", type=int, default=20, show_default=True,
        help="Few-shot classes have fewer training images than this.",
    )(function)
    return click.option(
        "--many-threshold", type=int, default=100, show_default=True,
        help="Many-shot classes have more training images than this.",
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


def describe_result(result: Mapping[str, Any]) -> str:
    """A readable summary of one ``decouple head`` result object (DESIGN.md)."""
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
    return f"{result['features']}\n{title}\n{metrics_table(result['metrics'])}"


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
