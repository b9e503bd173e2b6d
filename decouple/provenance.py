"""Provenance: what produced a result, and its conversion to plain JSON.

Package versions, the sha256 of a file's bytes, UTC timestamps, and
:func:`jsonable`, which turns mappings, tuples, paths and numpy values into
the plain types ``json.dumps`` takes. Standard library only, so the results
store and ``decouple --help`` stay light.
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from typing import Any, Dict, Mapping, Union

PathLike = Union[str, "os.PathLike[str]"]

# Distribution name (as pip knows it) -> module name (as imported).
VERSION_PACKAGES: Mapping[str, str] = {
    "decouple": "decouple",
    "torch": "torch",
    "numpy": "numpy",
    "timm": "timm",
    "h5py": "h5py",
    "faiss-cpu": "faiss",
    "scikit-learn": "sklearn",
}


def package_versions(packages: Mapping[str, str] = VERSION_PACKAGES) -> Dict[str, str]:
    """Versions of Python and of ``packages`` that are installed; imports nothing.

    A module already loaded reports its own ``__version__``, which keeps local
    build tags (torch's ``2.3.0+cu121``); any other comes from the installed
    metadata. ``cuda`` is added when torch is loaded and sees a GPU.
    """
    versions = {"python": platform.python_version()}
    for distribution, module_name in packages.items():
        version = getattr(sys.modules.get(module_name), "__version__", None)
        if version is None:
            try:
                version = metadata.version(distribution)
            except metadata.PackageNotFoundError:
                continue
        versions[distribution] = str(version)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        versions["cuda"] = str(torch.version.cuda)
    return versions


def file_sha256(path: PathLike, *, chunk_size: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes: the content identity of weights and feature files."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def utc_now() -> str:
    """The current UTC time, ISO-8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def jsonable(value: Any, *, nonfinite_to_none: bool = True) -> Any:
    """``value`` as plain JSON types: dict (str keys), list, str, int, float, bool, None.

    Mappings, lists and tuples are converted item by item, paths become
    strings, numpy scalars and arrays (anything with ``tolist``) become
    Python numbers and lists. NaN and infinity become None (null), since JSON
    has no such numbers; ``nonfinite_to_none=False`` keeps them, for a caller
    that rejects them with ``json.dumps(..., allow_nan=False)`` instead.
    """
    if isinstance(value, Mapping):
        return {str(key): jsonable(item, nonfinite_to_none=nonfinite_to_none) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item, nonfinite_to_none=nonfinite_to_none) for item in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):
        return jsonable(value.tolist(), nonfinite_to_none=nonfinite_to_none)
    if nonfinite_to_none and isinstance(value, float) and not math.isfinite(value):
        return None
    return value
