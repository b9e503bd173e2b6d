"""YAML text with the line of every key, so that a config error names the
file, the line and the key path (``sweep.yaml, line 4: grid.loss[1]: ...``)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

import yaml

from decouple.errors import ConfigError, DecoupleError

KeyPath = Tuple[Union[str, int], ...]


def format_key_path(path: KeyPath) -> str:
    """("grid", "loss", 2) -> "grid.loss[2]"."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"


class ConfigPlaces:
    """Where each key path sits in the config text, and the errors that cite it."""

    def __init__(self, source: Optional[str], lines: Optional[Dict[KeyPath, int]] = None) -> None:
        self.source = source
        self.lines = lines or {}

    def error(self, path: KeyPath, message: str, cls: type = ConfigError) -> DecoupleError:
        """``cls`` with "<source>, line <n>: <key path>: <message>", the line
        being that of ``path`` or of its nearest enclosing key."""
        where = self.source or "sweep config"
        line = None
        for end in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                break
        location = f"{where}, line {line}" if line is not None else where
        return cls(f"{location}: {format_key_path(path)}: {message}")


def _node_lines(node: Any, path: KeyPath, lines: Dict[KeyPath, int], duplicates: List[KeyPath]) -> None:
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


def parse_yaml(text: str, *, source: str) -> Tuple[Any, ConfigPlaces]:
    """YAML text -> (data, places); a syntax error names the file, line and column."""
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
    places = ConfigPlaces(source, lines)
    if duplicates:
        raise places.error(duplicates[0], "key given twice; each key may appear once")
    return data, places
