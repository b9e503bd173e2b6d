"""Atomic file writes: write beside the target, rename at the end.

A reader, a crash or a full disk never sees half a file: the data go to a
temporary file in the target's folder (same file system, so the rename is
atomic), which replaces the target only once it is complete and is removed
if writing fails.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


def temporary_sibling(path: PathLike) -> Path:
    """``<name>.tmp-<pid>`` in the folder of ``path``."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is renamed to ``path``.

    ::

        with atomic_path("out/model.pt") as tmp:
            torch.save(state, tmp)

    The folder of ``path`` is created if needed. If the block raises, the
    temporary file is removed and the exception propagates; ``path`` is left
    as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as stream:
            stream.write(text)
    return Path(path)
