"""A name -> factory registry, filled by a decorator (the timm pattern).

Losses, samplers and heads each keep one :class:`Registry`. An unknown name
raises :class:`~decouple.errors.UnknownNameError` listing the known names and
the closest match.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from decouple.errors import ConfigError, UnknownNameError, did_you_mean


def first_doc_line(obj: Any) -> str:
    """First non-empty line of ``obj``'s docstring, or ''."""
    doc = inspect.getdoc(obj) or ""
    for line in doc.splitlines():
        if line.strip():
            return line.strip()
    return ""


class Registry:
    """Registry of named factories of one kind (e.g. ``"loss"``)."""

    def __init__(self, kind: str, plural: Optional[str] = None) -> None:
        self.kind = kind
        self.plural = plural or (kind + "es" if kind.endswith("s") else kind + "s")
        self._entries: Dict[str, Callable[..., Any]] = {}
        self._descriptions: Dict[str, str] = {}

    def register(self, name: str, *, description: Optional[str] = None) -> Callable:
        """Decorator: ``@REGISTRY.register("name")`` on a class or function."""

        def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = factory
            self._descriptions[name] = description or first_doc_line(factory)
            return factory

        return decorator

    def names(self) -> List[str]:
        """Registered names, in registration order."""
        return list(self._entries)

    def describe(self) -> List[Tuple[str, str]]:
        """(name, one-line description) for every entry."""
        return [(name, self._descriptions[name]) for name in self._entries]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def check(self, name: str, *, where: str = "") -> str:
        """Return ``name`` if registered, else raise a helpful UnknownNameError."""
        if name in self._entries:
            return name
        prefix = f"{where}: " if where else ""
        raise UnknownNameError(prefix + self.unknown_message(name))

    def unknown_message(self, name: str) -> str:
        """"unknown loss 'focall' (did you mean 'focal'?); known losses: ..."."""
        hint = did_you_mean(name, self._entries)
        return f"unknown {self.kind} {name!r}{hint}; known {self.plural}: {', '.join(self._entries)}"

    def get(self, name: str, *, where: str = "") -> Callable[..., Any]:
        """The factory registered as ``name``."""
        return self._entries[self.check(name, where=where)]

    def parameters(self, name: str) -> Dict[str, Any]:
        """Keyword parameters (name -> default) the factory ``name`` accepts."""
        factory = self.get(name)
        target = factory.__init__ if inspect.isclass(factory) else factory
        params = {}
        for param in inspect.signature(target).parameters.values():
            if param.name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            params[param.name] = None if param.default is param.empty else param.default
        return params

    def create(self, name: str, *args: Any, where: str = "", **kwargs: Any) -> Any:
        """Build ``name`` with ``kwargs``; an unknown keyword is a ConfigError naming it."""
        factory = self.get(name, where=where)
        accepted = self.parameters(name)
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            prefix = f"{where}: " if where else ""
            known = ", ".join(accepted) or "none"
            raise ConfigError(
                f"{prefix}{self.kind} {name!r} takes no parameter {unknown[0]!r}; "
                f"it takes: {known}"
            )
        return factory(*args, **kwargs)
