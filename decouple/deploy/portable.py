"""Portable exports of a :class:`~decouple.deploy.model.DecoupleModel` that run
without decouple (or timm) installed: TorchScript (``torch.jit.trace``), and
ONNX where the ``onnx`` package is installed.

Both take preprocessed images (B, 3, H, W) and return calibrated logits
(B, C). The class names, preprocessing and temperature travel with the file:
in TorchScript as the extra file ``decouple.json``
(``torch.jit.load(path, _extra_files={"decouple.json": ""})``), in ONNX as
metadata property ``decouple``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Dict

import torch

from decouple.atomic import atomic_path
from decouple.deploy.model import DecoupleModel
from decouple.errors import DecoupleError
from decouple.provenance import jsonable
from decouple.registry import Registry

EXPORTS = Registry("model format")
EXTRA_FILE = "decouple.json"


def portable_meta(model: DecoupleModel) -> Dict[str, Any]:
    """What a portable file needs besides the network: class names, preprocessing, temperature, method."""
    return jsonable({
        "class_names": model.class_names,
        "preprocess": model.preprocess,
        "temperature": float(model.temperature),
        "method": model.meta.get("method", {}),
        "selection": model.meta.get("selection", {}),
        "output": "calibrated logits (B, C); softmax gives the probabilities",
    })


def example_input(model: DecoupleModel, batch: int = 2) -> torch.Tensor:
    """A seeded random batch at the model's input size, on its device."""
    generator = torch.Generator().manual_seed(0)
    device = model.temperature.device
    return torch.randn(batch, *model.input_size, generator=generator).to(device)


@EXPORTS.register("torchscript")
def export_torchscript(model: DecoupleModel, path: Path) -> None:
    """A traced TorchScript module (``torch.jit.load`` runs it with torch alone)."""
    model = model.eval()
    extra = {EXTRA_FILE: json.dumps(portable_meta(model), sort_keys=True)}
    with warnings.catch_warnings():
        # TorchScript still loads and runs everywhere; torch only steers new code to torch.export.
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.*deprecated")
        with torch.no_grad():
            traced = torch.jit.trace(model, example_input(model), check_trace=False)
        with atomic_path(path) as tmp:
            torch.jit.save(traced, str(tmp), _extra_files=extra)


@EXPORTS.register("onnx")
def export_onnx(model: DecoupleModel, path: Path) -> None:
    """An ONNX graph with a dynamic batch axis, by torch's ``torch.export``-based
    exporter (needs the ``onnx`` and ``onnxscript`` packages)."""
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise DecoupleError(f"--format onnx needs {' and '.join(missing)}: pip install 'decouple[onnx]'")
    model = model.eval()
    with atomic_path(path) as tmp:
        torch.onnx.export(
            model, (example_input(model),), str(tmp), input_names=["images"], output_names=["logits"],
            dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
        )
        _add_onnx_metadata(tmp, json.dumps(portable_meta(model), sort_keys=True))


def _add_onnx_metadata(path: Path, text: str) -> None:
    onnx = importlib.import_module("onnx")
    graph = onnx.load(str(path))
    entry = graph.metadata_props.add()
    entry.key, entry.value = "decouple", text
    onnx.save(graph, str(path))


def export_portable(model: DecoupleModel, path, *, format: str) -> Path:
    """Write ``model`` to ``path`` in ``format`` (``EXPORTS``: torchscript, onnx), atomically."""
    export: Callable[[DecoupleModel, Path], None] = EXPORTS.get(format, where="--format")
    path = Path(path)
    on_cpu = model if model.temperature.device.type == "cpu" else copy.deepcopy(model).cpu()
    export(on_cpu, path)
    return path
