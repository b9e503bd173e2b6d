"""Errors for bad input.

Every error a user can cause by what they pass in (a file, a name, a config)
is a :class:`DecoupleError`: a ``ValueError`` whose message is one line that
names the file, the field and what was expected. The CLI turns it into that
line on stderr and exit code 2.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class DecoupleError(ValueError):
    """Bad input: one line naming the file, the field and the expectation."""


class UnknownNameError(DecoupleError):
    """A registry name (loss, sampler, head, ...) that does not exist."""


class FeatureFileError(DecoupleError):
    """A feature file that is missing, unreadable or breaks the v1 contract."""


class ConfigError(DecoupleError):
    """A sweep config or option value that is invalid."""


class DataError(DecoupleError):
    """An image folder, manifest or data set that cannot be used."""


class ClassCountError(ConfigError):
    """A per-class setting (one value per class) whose length does not match
    the class count of the data it is used on."""


def did_you_mean(name: object, known: Iterable[str], *, n: int = 1, cutoff: float = 0.6) -> str:
    """" (did you mean 'x'?)" naming the up to ``n`` entries of ``known``
    closest to ``name`` (difflib), or "" when none is close: the hint every
    unknown-name message appends."""
    close = difflib.get_close_matches(str(name), list(known), n=n, cutoff=cutoff)
    return f" (did you mean {' or '.join(repr(entry) for entry in close)}?)" if close else ""


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type's name when the
    message is empty), cut to ``limit`` characters: the reason inside a
    one-line error about a library's failure."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]
