"""The layouts of ``decouple export --layout`` by name: "default" (the
summary table or per-cell rows, :mod:`decouple.study.export`) and "study"
(:mod:`decouple.study.study_layout`)."""

from __future__ import annotations

from typing import Any, Callable, Dict, Sequence

from decouple.errors import DecoupleError
from decouple.study import export, study_layout
from decouple.study.store import CellRecord, RunRecord


def _default_layout(records: Sequence[CellRecord], *, runs: Sequence[RunRecord] = (), **options: Any) -> str:
    """:func:`decouple.study.export.render`; it lists no stage-one ``runs``."""
    return export.render(records, **options)


#: Layout name -> its render function: records, the stage-one ``runs``, the options of export.render.
LAYOUTS: Dict[str, Callable[..., str]] = {"default": _default_layout, "study": study_layout.render_layout}


def render(records: Sequence[CellRecord], *, layout: str = "default", runs: Sequence[RunRecord] = (),
           **options: Any) -> str:
    """The export text of ``layout`` (:data:`LAYOUTS`); ``options`` those of
    :func:`decouple.study.export.render`, ``runs`` (``ResultStore.runs()``)
    listed after the study layout's tables."""
    if layout not in LAYOUTS:
        raise DecoupleError(f"unknown export layout {layout!r}; known layouts: {', '.join(LAYOUTS)}")
    return LAYOUTS[layout](records, runs=runs, **options)
