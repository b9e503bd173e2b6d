"""The layout of DESIGN.md holds: no import cycles, no hidden imports inside
functions of the library, and each room imports only the rooms below it.

Rooms, bottom up: the shared ground (the modules at the top of
``decouple/``), ``stage_two``, ``stage_one`` (its fine-tuning uses stage
two's losses and samplers), ``deploy`` (a backbone and a head as one
model), ``study`` (which saves a sweep's best cell with deploy); ``cli``
sits on top and nothing in ``decouple`` imports it.
"""

import ast
import importlib
import sys
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "decouple"
#: Which rooms each room may import (besides itself).
ALLOWED = {
    "shared": {"shared"},
    "stage_two": {"shared"},
    "stage_one": {"shared", "stage_two"},
    "deploy": {"shared", "stage_two", "stage_one"},
    "study": {"shared", "stage_two", "stage_one", "deploy"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else "shared"


def _imported(node: ast.AST) -> List[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module:
        if node.level:
            return ["<relative>"]
        return [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return []


def _outside_functions(node: ast.AST):
    """Every node run at import time: the module's statements, with their
    ``try:``, ``if TYPE_CHECKING:`` and class bodies, but no function body."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        yield child
        yield from _outside_functions(child)


def _package_imports(path: Path) -> Set[str]:
    """The package's own modules that ``path`` imports when it is imported."""
    found = set()
    for node in _outside_functions(ast.parse(path.read_text())):
        for name in _imported(node):
            assert name != "<relative>", f"{path.name}: use absolute imports of the package"
            if name in MODULES:
                found.add(name)
    return found


GRAPH: Dict[str, Set[str]] = {name: _package_imports(path) - {name} for name, path in MODULES.items()}


def test_the_library_imports_nothing_inside_functions_or_classes():
    hidden = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                for inner in ast.walk(node):
                    if _imported(inner):
                        hidden.append(f"{name}.{node.name} (line {inner.lineno}): {_imported(inner)[0]}")
    assert not hidden, "imports inside functions or classes:\n" + "\n".join(hidden)


def test_the_checks_see_imports_under_try_and_if():
    tree = ast.parse("try:\n    import decouple.errors\nexcept ImportError:\n    pass\n"
                     "if True:\n    from decouple.registry import Registry\n"
                     "def f():\n    import decouple.metrics\n")
    seen = {name for node in _outside_functions(tree) for name in _imported(node)}
    assert {"decouple.errors", "decouple.registry"} <= seen and "decouple.metrics" not in seen


def test_the_module_graph_has_no_cycle():
    state: Dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: List[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [module, target] if target in path else [module, target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [module])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [])


def test_each_room_imports_only_the_rooms_below_it():
    wrong = [
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        for target in targets
        if _room(target) != _room(module) and _room(target) not in ALLOWED[_room(module)]
    ]
    assert not wrong, "\n".join(wrong)


def test_the_library_never_imports_the_cli():
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            assert not any(imported.split(".")[0] == "cli" for imported in _imported(node)), name


def test_every_module_imports_alone():
    """Each module imported first, into a fresh set of the package's modules
    (third parties stay loaded, so this takes a second); the package's
    modules of this test session are put back afterwards."""
    saved = {name: module for name, module in sys.modules.items() if name == "decouple" or name.startswith("decouple.")}
    try:
        for name in sorted(MODULES):
            for loaded in [loaded for loaded in sys.modules if loaded == "decouple" or loaded.startswith("decouple.")]:
                del sys.modules[loaded]
            importlib.import_module(name)
    finally:
        for loaded in [loaded for loaded in sys.modules if loaded == "decouple" or loaded.startswith("decouple.")]:
            del sys.modules[loaded]
        sys.modules.update(saved)
