"""Classifying images with a saved model: the inputs (files, folders, CSV
manifests), the batched loop that survives bad images, and the rows it
writes (CSV or JSON lines).

Each image gets one row: its path, the top-k class names with their
calibrated probabilities, and ``error`` (empty when it was classified; the
reason when it could not be read, in which case the run goes on).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, TextIO, Tuple, Union

import torch
from PIL import Image
from tqdm.auto import tqdm

from decouple.atomic import atomic_path
from decouple.deploy.model import DecoupleModel
from decouple.errors import DataError, DecoupleError
from decouple.stage_one.images import load_image
from decouple.stage_one.manifest import manifest_lines, resolve_ref

FORMATS = ("csv", "jsonl")
MANIFEST_SUFFIXES = (".csv",)


@dataclass(frozen=True)
class Input:
    """One image to classify: its reference (a path, or a source's own
    reference such as ``PICKLE#INDEX``) and the label a manifest gives it."""

    ref: str
    label: Optional[str] = None


def collect_inputs(items: Sequence[Union[str, os.PathLike]], *, split: Optional[str] = None) -> List[Input]:
    """Every image named by ``items``: files as given, folders recursively
    (every file but hidden ones, sorted; a file that is no image gets an
    error row later), CSV manifests (``path[,label[,split]]``, relative
    paths relative to the CSV) row by row, only ``split``'s rows if given."""
    inputs: List[Input] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                str(file) for file in path.rglob("*")
                if file.is_file() and not any(part.startswith(".") for part in file.relative_to(path).parts)
            )
            inputs.extend(Input(ref) for ref in found)
        elif path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
            inputs.extend(read_input_manifest(path, split=split))
        elif path.is_file():
            inputs.append(Input(str(path)))
        else:
            raise DataError(f"{path}: no such file or folder")
    if not inputs:
        raise DataError(f"no images in {', '.join(str(item) for item in items)}")
    return inputs


def read_input_manifest(path: Path, *, split: Optional[str] = None) -> List[Input]:
    """Rows of a CSV manifest (``path[,label[,split]]``, header optional)."""
    base = path.parent.resolve()
    inputs = []
    for _, row in manifest_lines(path):
        label = row[1].strip() if len(row) > 1 and row[1].strip() else None
        if split is None or (len(row) > 2 and row[2].strip() == split):
            inputs.append(Input(os.path.normpath(resolve_ref(row[0].strip(), base)), label))
    if not inputs:
        where = f" of split {split!r}" if split is not None else ""
        raise DataError(f"{path}: the manifest holds no rows{where}; expected path[,label[,split]] lines")
    return inputs


def _check_options(*, top_k: int, batch_size: int) -> None:
    for name, value in (("--top-k", top_k), ("--batch-size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DecoupleError(f"{name} must be an integer >= 1; got {value!r}")


def check_labels(model: DecoupleModel, inputs: Sequence[Any]) -> None:
    """A manifest's labels must be the model's class names (else every
    comparison would silently count as wrong)."""
    known = set(model.class_names)
    unknown = sorted({label for label in (getattr(item, "label", None) for item in inputs)
                      if label is not None and label not in known})
    if unknown:
        shown = ", ".join(model.class_names[:10]) + (", ..." if len(model.class_names) > 10 else "")
        raise DataError(
            f"manifest label {unknown[0]!r} is not one of the model's classes ({shown}); "
            f"the labels of a manifest must be class names"
        )


class _Images(torch.utils.data.Dataset):
    """(tensor or None, error text) per input: a bad image is a value, not an exception."""

    def __init__(self, inputs: Sequence[Any], transform: Callable) -> None:
        self.inputs = inputs
        self.transform = transform

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> Tuple[Optional[torch.Tensor], str]:
        item = self.inputs[index]
        try:
            image = item if isinstance(item, Image.Image) else load_image(item.ref)
            return self.transform(image.convert("RGB")), ""
        except Exception as exc:  # any decoding failure becomes the row's error
            text = " ".join(str(exc).split()) or "unreadable"
            return None, f"{type(exc).__name__}: {text}"[:300]


def _collate(batch: List[Tuple[Optional[torch.Tensor], str]]) -> Tuple[Optional[torch.Tensor], List[str]]:
    tensors = [tensor for tensor, _ in batch if tensor is not None]
    return (torch.stack(tensors) if tensors else None), [error for _, error in batch]


@dataclass
class PredictSummary:
    """What a run did: images classified, failed, and top-1 against known labels."""

    classified: int = 0
    failed: int = 0
    labelled: int = 0
    correct: int = 0

    @property
    def accuracy(self) -> Optional[float]:
        return self.correct / self.labelled if self.labelled else None

    def __str__(self) -> str:
        text = f"classified {self.classified} image(s), {self.failed} failed"
        if self.labelled:
            text += f"; top-1 accuracy {100 * self.accuracy:.2f}% on the {self.labelled} classified with a known label"
        return text


def predict_rows(
    model: DecoupleModel,
    inputs: Sequence[Any],
    *,
    top_k: int = 5,
    batch_size: int = 64,
    device: Union[str, torch.device, None] = None,
    workers: int = 0,
    progress: bool = False,
    summary: Optional[PredictSummary] = None,
) -> Iterator[Dict[str, Any]]:
    """One row per input, in order: ``path``, ``label`` (the manifest's, if
    any), ``labels`` and ``probabilities`` (top-k, calibrated), ``error``.
    ``inputs`` are :class:`Input` or PIL images. The model runs on
    ``device`` if given (it is moved there), else where it is.
    ``summary`` is updated as rows go. The options and labels are checked
    at the call, before any row is asked for (so before anything is written)."""
    _check_options(top_k=top_k, batch_size=batch_size)
    check_labels(model, inputs)
    if device is not None:
        model = model.to(device)
    loader = torch.utils.data.DataLoader(
        _Images(inputs, model.transform()), batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=_collate, pin_memory=model.temperature.device.type == "cuda",
    )
    return _rows(model.eval(), inputs, loader, top_k=min(int(top_k), len(model.class_names)),
                 summary=summary if summary is not None else PredictSummary(), progress=progress)


def _rows(model: DecoupleModel, inputs: Sequence[Any], loader, *, top_k: int, summary: PredictSummary,
          progress: bool) -> Iterator[Dict[str, Any]]:
    """The rows of :func:`predict_rows`, batch by batch."""
    device = model.temperature.device
    bar = tqdm(total=len(inputs), unit="img", desc="predict", disable=not progress, leave=False)
    position = 0
    try:
        with torch.inference_mode():
            for images, errors in loader:
                if images is not None:
                    probabilities = torch.softmax(model(images.to(device, non_blocking=True)).float(), dim=1)
                    values, indices = probabilities.topk(top_k, dim=1)
                    values, indices = values.cpu().tolist(), indices.cpu().tolist()
                good = 0
                for error in errors:
                    item = inputs[position]
                    row: Dict[str, Any] = {
                        "path": getattr(item, "ref", None),
                        "label": getattr(item, "label", None),
                        "labels": [],
                        "probabilities": [],
                        "error": error or None,
                    }
                    if error:
                        summary.failed += 1
                    else:
                        row["labels"] = [model.class_names[index] for index in indices[good]]
                        row["probabilities"] = values[good]
                        good += 1
                        summary.classified += 1
                        if row["label"] is not None:
                            summary.labelled += 1
                            summary.correct += int(row["labels"][0] == row["label"])
                    position += 1
                    yield row
                bar.update(len(errors))
    finally:
        bar.close()


def predict(
    model: DecoupleModel, images: Iterable[Union[str, os.PathLike, Image.Image]], *, top_k: int = 5,
    batch_size: int = 64, device: Union[str, torch.device, None] = None,
) -> List[Dict[str, Any]]:
    """Classify PIL images or image paths with ``model`` (:func:`~decouple.deploy.model.load_model`):
    one dict per image with ``labels`` and ``probabilities`` (top-k, best
    first) and ``error`` (None, or why the image could not be read)."""
    inputs = [image if isinstance(image, Image.Image) else Input(str(image)) for image in images]
    rows = list(predict_rows(model, inputs, top_k=top_k, batch_size=batch_size, device=device))
    for row in rows:
        row.pop("label")
    return rows


class RowWriter:
    """Writes prediction rows as CSV (``path[,label],label_1,probability_1,...,error``)
    or JSON lines, to a text stream."""

    def __init__(self, stream: TextIO, *, format: str, top_k: int, with_labels: bool) -> None:
        if format not in FORMATS:
            raise DecoupleError(f"--format must be one of {', '.join(FORMATS)}; got {format!r}")
        self.stream, self.format, self.top_k, self.with_labels = stream, format, top_k, with_labels
        if format == "csv":
            columns = ["path"] + (["label"] if with_labels else [])
            for rank in range(1, top_k + 1):
                columns += [f"label_{rank}", f"probability_{rank}"]
            self.columns = columns + ["error"]
            self.csv = csv.writer(stream, lineterminator="\n")
            self.csv.writerow(self.columns)

    def write(self, row: Dict[str, Any]) -> None:
        if self.format == "jsonl":
            data = dict(row)
            if not self.with_labels:
                data.pop("label", None)
            self.stream.write(json.dumps(data) + "\n")
            return
        values: List[Any] = [row["path"]] + ([row["label"] or ""] if self.with_labels else [])
        ranked = list(zip(row["labels"], row["probabilities"]))
        for rank in range(self.top_k):
            values += [ranked[rank][0], f"{ranked[rank][1]:.6g}"] if rank < len(ranked) else ["", ""]
        self.csv.writerow(values + [row["error"] or ""])


def write_rows(
    rows: Iterable[Dict[str, Any]], out: Optional[Union[str, os.PathLike]], *, format: str, top_k: int,
    with_labels: bool,
) -> None:
    """Write prediction rows to ``out`` atomically (a temporary file renamed at
    the end), or to stdout as they come when ``out`` is None."""
    with _output(out) as stream:
        writer = RowWriter(stream, format=format, top_k=top_k, with_labels=with_labels)
        for row in rows:
            writer.write(row)


@contextlib.contextmanager
def _output(out: Optional[Union[str, os.PathLike]]) -> Iterator[TextIO]:
    """stdout, or a temporary file committed to ``out`` when the block succeeds."""
    if out is None:
        yield sys.stdout
        return
    with atomic_path(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        yield handle


def write_predictions(
    model: DecoupleModel,
    inputs: Sequence[Input],
    out: Optional[Union[str, os.PathLike]],
    *,
    format: str = "csv",
    top_k: int = 5,
    summary: Optional[PredictSummary] = None,
    **options: Any,
) -> PredictSummary:
    """Classify ``inputs`` and write a row per image (:func:`write_rows`);
    ``options`` go to :func:`predict_rows`."""
    summary = summary if summary is not None else PredictSummary()
    rows = predict_rows(model, inputs, top_k=top_k, summary=summary, **options)  # checks before writing
    with_labels = any(getattr(item, "label", None) is not None for item in inputs)
    write_rows(rows, out, format=format, top_k=min(int(top_k), len(model.class_names)), with_labels=with_labels)
    return summary
