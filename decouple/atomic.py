"""Atomic, durable file writes: write beside the target, flush to disk, rename.

A reader, a crash, a power cut or a full disk never sees half a file: the
data go to a temporary file in the target's folder (same file system, so the
rename is atomic), which is flushed to the disk (``fsync``) and only then
replaces the target; the folder is flushed too, so that the rename itself
survives a power cut. A temporary file whose writing fails is removed, and
the target is left as it was.
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


def fsync_path(path: PathLike) -> None:
    """Flush a file's data, or a folder's entries, to the disk. Folders cannot
    be opened on Windows, whose renames need no such flush; there it is a no-op."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):
        if os.path.isdir(path):
            return
        raise
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def commit(tmp: PathLike, path: PathLike) -> Path:
    """Make the complete file ``tmp`` the file ``path``: flush it, rename it
    over ``path`` (atomic), then flush the folder so the rename is durable."""
    path = Path(path)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)
    return path


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is committed to ``path``.

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
        commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as stream:
            stream.write(text)
    return Path(path)
