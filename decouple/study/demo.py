"""The demo: the whole pipeline on real data that ships with scikit-learn.

scikit-learn's bundled handwritten digits (Alpaydin & Kaynak, UCI optical
recognition of handwritten digits: 1,797 images of 8x8 pixels, 10 classes)
are written out as a 32-pixel image folder with a held-out balanced test
split, made long-tailed by ``decouple extract --imbalance`` (Cao et al. 2019
profile), fine-tuned with a CIFAR ResNet-32 on the CPU, and then every
loss, sampler and head of stage two runs in one sweep; the tables and plots
land in the output folder. It ends as a user would: the val-best method
saved as a model file (``decouple save-model``) classifies a handful of
image files (``decouple predict``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from decouple.atomic import write_text_atomic
from decouple.deploy.model import load_model
from decouple.deploy.predict import PredictSummary, collect_inputs, predict_rows, write_rows
from decouple.stage_one.extract import ExtractConfig, run_extract
from decouple.stage_one.finetune import FinetuneConfig
from decouple.stage_one.splits import SplitOptions
from decouple.stage_two.heads import HEADS
from decouple.stage_two.losses import LOSSES
from decouple.stage_two.samplers import SAMPLERS
from decouple.study.config import parse_config
from decouple.study.export import render
from decouple.study.plots import export_plots
from decouple.study.recommend import describe, recommend
from decouple.study.runner import run_sweep
from decouple.study.select import save_best
from decouple.study.store import CellRecord, load_records

DEMO_METRICS = ("top1", "macro_f1", "many", "medium", "few")
#: Methods are ranked on val (never test) by mean per-class accuracy.
RANK_SPLIT, RANK_METRIC = "val", "mean_class_acc"


def write_digits_folder(root: Path, *, test_per_class: int = 50, size: int = 32, seed: int = 0) -> Path:
    """Write scikit-learn's digits as ``root/{train,test}/<digit>/NNNN.png``.

    ``test_per_class`` images of every digit go to a balanced test split; the
    rest form the training pool that extraction makes long-tailed.
    Returns ``root``; an existing complete folder is reused.
    """
    marker = root / ".complete"
    if marker.exists():
        return root
    digits = load_digits()
    rng = np.random.default_rng(seed)
    for digit in range(10):
        indices = rng.permutation(np.flatnonzero(digits.target == digit))
        for split, chosen in (("test", indices[:test_per_class]), ("train", indices[test_per_class:])):
            folder = root / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for index in chosen:
                pixels = (digits.images[index] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
                image = Image.fromarray(pixels, mode="L").resize((size, size), Image.BILINEAR)
                image.convert("RGB").save(folder / f"{index:04d}.png")
    marker.touch()
    return root


def demo_sweep_config(features_path: Path, db_path: Path, *, seeds: List[int], epochs: Optional[int] = None) -> Dict:
    """Every registered head, loss and sampler over the demo's feature file;
    ``epochs`` None trains with stage two's default budget."""
    return {
        "features": [{"path": str(features_path), "name": "digits_lt", "backbone": "resnet32_cifar"}],
        "grid": {
            "head": HEADS.names(),
            "loss": LOSSES.names(),
            "sampler": SAMPLERS.names(),
            "seed": list(seeds),
        },
        "train": {} if epochs is None else {"epochs": epochs},
        "db": str(db_path),
    }


def run_demo(
    out_dir: str = "demo_out",
    *,
    imbalance: float = 10.0,
    finetune_epochs: int = 20,
    head_epochs: Optional[int] = None,
    seeds: Optional[List[int]] = None,
    top: int = 12,
    log: Callable[[str], None] = print,
) -> str:
    """Run the demo into ``out_dir``; returns a Markdown table of the ``top``
    methods ranked on val, with their test scores, then the saved model's
    predictions for a handful of image files.

    Writes ``data/`` (the digits folder), ``features/digits_lt.h5``,
    ``results.db``, ``results.md``, ``results.csv``, ``cells.csv``,
    ``plots/``, ``recommendation.json``, ``model.pt`` (the val-best method),
    ``test_images/`` and ``predictions.csv``. A rerun reuses the finished parts.
    """
    out = Path(out_dir)
    seeds = [0] if seeds is None else list(seeds)
    data = write_digits_folder(out / "data")
    features_path = out / "features" / "digits_lt.h5"
    if not features_path.exists():
        log(f"stage one: fine-tuning resnet32_cifar on long-tailed digits (IF={imbalance:g}), {finetune_epochs} epochs")
        extract_digits_features(data, features_path, imbalance=imbalance, finetune_epochs=finetune_epochs, log=log)
    db_path = out / "results.db"
    config = parse_config(
        demo_sweep_config(features_path, db_path, seeds=seeds, epochs=head_epochs),
        source="demo",
    )
    log("stage two: every head x loss x sampler")
    summary = run_sweep(config, progress=True)
    log(str(summary))
    records = load_records(db_path)
    best_table = _write_tables_and_plots(records, out, top=top, log=log)
    heading = (
        f"the {top} best of {len(records)} methods by {RANK_SPLIT} {RANK_METRIC}, then the "
        f"linear / ce / instance baseline (all methods in {out / 'results.md'}):"
    )
    return (heading + "\n" + best_table + "\n" + recommend_best(out, db_path) + "\n"
            + deploy_best(out, db_path, data, log=log))


def recommend_best(out: Path, db_path: Path) -> str:
    """``decouple recommend`` on the demo's sweep (also written as
    ``recommendation.json``); returns the command and what it printed."""
    found = recommend(str(db_path), metric=RANK_METRIC)
    write_text_atomic(out / "recommendation.json", json.dumps(found.to_json(), indent=1, allow_nan=False) + "\n")
    return f"$ decouple recommend --db {db_path}\n{describe(found)}\n"


def deploy_best(out: Path, db_path: Path, data: Path, *, log: Callable[[str], None]) -> str:
    """Save the val-best method as ``model.pt`` and classify with it one
    held-out test image of every class, copied to ``test_images/`` as a
    user's new images would be; returns the commands run and the predictions."""
    model_path = out / "model.pt"
    save_command = f"decouple save-model --db {db_path} -o {model_path}"
    saved = save_best(str(db_path), str(model_path), metric=RANK_METRIC, split=RANK_SPLIT)
    folder = out / "test_images"
    for class_folder in sorted((data / "test").iterdir()):
        target = folder / class_folder.name
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(sorted(class_folder.iterdir())[-1], target)
    predictions = out / "predictions.csv"
    predict_command = f"decouple predict {model_path} {folder} --top-k 3 -o {predictions}"
    summary = PredictSummary()
    model = load_model(model_path)
    rows = list(predict_rows(model, collect_inputs([folder]), top_k=3, summary=summary))
    write_rows(rows, predictions, format="csv", top_k=3, with_labels=False)
    lines = [f"$ {save_command}", saved.describe(), f"$ {predict_command}", str(summary),
             "| image | predicted | probability | runner-up |", "| --- | --- | ---: | --- |"]
    for row in rows:
        image = Path(row["path"]).relative_to(out)
        if row["error"]:
            lines.append(f"| {image} | error: {row['error']} | | |")
            continue
        runner_up = f"{row['labels'][1]} ({100 * row['probabilities'][1]:.1f}%)" if len(row["labels"]) > 1 else ""
        lines.append(f"| {image} | {row['labels'][0]} | {100 * row['probabilities'][0]:.1f}% | {runner_up} |")
    return "\n".join(lines) + "\n"


def extract_digits_features(
    data: Path, features_path: Path, *, imbalance: float, finetune_epochs: int, log: Callable[[str], None]
) -> None:
    """Stage one on the digits folder: a long-tailed split, a CIFAR ResNet-32
    fine-tuned on the CPU, float32 embeddings of every split."""
    run_extract(
        ExtractConfig(
            data=str(data),
            backbone="resnet32_cifar",
            split=SplitOptions(imbalance=imbalance, val_per_class=20, seed=0),
            out=str(features_path),
            dtype="float32",
            finetune=FinetuneConfig(epochs=finetune_epochs, batch_size=32, lr=0.05, warmup_epochs=1.0),
        ),
        log=log,
    )


def _write_tables_and_plots(records: List[CellRecord], out: Path, *, top: int, log: Callable[[str], None]) -> str:
    """Write results.md, results.csv, cells.csv and the plots of the ``top``
    methods plus the baseline; returns the Markdown table of those."""
    splits = ["test", "test_lt"]
    table = render(records, format="markdown", metrics=list(DEMO_METRICS), splits=splits)
    write_text_atomic(out / "results.md", table)
    best = top_records(records, top)
    baseline = [record for record in records
                if (record.head, record.loss, record.sampler) == ("linear", "ce", "instance")]
    best += [record for record in baseline if record not in best]
    best_table = render(best, format="markdown", metrics=list(DEMO_METRICS), splits=["test"])
    write_text_atomic(out / "results.csv", render(records, format="csv", summary=True, metrics=list(DEMO_METRICS), splits=splits))
    write_text_atomic(out / "cells.csv", render(records, format="csv"))
    plots = export_plots(best, out / "plots", splits=["test"])
    log(f"wrote {out / 'results.md'}, {out / 'results.csv'}, {out / 'cells.csv'} and {len(plots)} plot files in {out / 'plots'}")
    return best_table


def top_records(records: List[CellRecord], count: int) -> List[CellRecord]:
    """The ``count`` records with the highest RANK_METRIC on RANK_SPLIT, best first."""

    def score(record: CellRecord) -> float:
        value = record.metrics.get(RANK_SPLIT, {}).get(RANK_METRIC)
        return float("-inf") if value is None else float(value)

    return sorted(records, key=score, reverse=True)[:count]
