"""Predict throughput: ``decouple predict`` against a bare inference loop, same process.

What it measures: images per second of classifying a real image folder
(CIFAR-10 test JPEGs, unpacked from ../shared/data/cifar10-jpg.tar.xz into a
temporary folder) with one saved model, two ways:

- bare: ``model = decouple.load_model(FILE)``; ``transform = model.transform()``;
  per batch of paths, ``torch.stack([transform(Image.open(p).convert("RGB"))])``,
  ``model(x)`` under ``torch.inference_mode()``, ``softmax``, ``topk``;
- predict: ``write_predictions(model, collect_inputs([folder]), out.csv,
  format="csv", top_k=5, batch_size=...)``, what ``decouple predict FILE
  FOLDER -o out.csv`` runs (folder walk and CSV rows included).

Same model object, preprocessing, batch size, torch threads and images on
both sides. After one warm-up of each, the two alternate for ``--rounds``
rounds (bare, predict, bare, predict, ...), so background load hits both
alike; every round's rate, the medians and the ratio predict / bare are
printed. Target (the predict issue): predict at 0.9x or better of the bare
loop's images/s.

The model file is built offline first, in a few seconds: ``decouple extract``
(library) of a frozen, randomly initialised timm ``--backbone`` on a few
CIFAR-10 *training* images, a linear head fitted on the cached features and
saved with :func:`decouple.deploy.save.save_cell` (what ``decouple head
--save-model`` does). Its accuracy is meaningless; its cost per image is that
of the backbone at ``--img-size``.

    .venv/bin/python benchmarks/predict.py                        # resnet18 at 64 px, 2,000 images
    .venv/bin/python benchmarks/predict.py --backbone resnet50 --img-size 224 --count 500
    .venv/bin/python benchmarks/predict.py --profile              # + cProfile of one predict run
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Tuple

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cifar_jpegs import unpack_cifar  # noqa: E402
from decouple.deploy.model import load_model  # noqa: E402
from decouple.deploy.predict import collect_inputs, write_predictions  # noqa: E402
from decouple.deploy.save import save_cell  # noqa: E402
from decouple.features import read_features  # noqa: E402
from decouple.stage_one.extract import ExtractConfig, run_extract  # noqa: E402
from decouple.stage_one.finetune import FinetuneConfig  # noqa: E402
from decouple.stage_one.splits import SplitOptions  # noqa: E402
from decouple.stage_two.cells import Cell  # noqa: E402
from decouple.stage_two.fit import fit_cell  # noqa: E402

CLASSES = 10


def build_model(train_dir: Path, work: Path, *, backbone: str, img_size: int) -> Path:
    """A model file: frozen ``backbone`` (seeded random), a linear head on its cached features."""
    extract = run_extract(
        ExtractConfig(
            data=str(train_dir), backbone=backbone, img_size=img_size, device="cpu", out=str(work / "bench.h5"),
            split=SplitOptions(val_fraction=0.2, min_val_per_class=1, test_fraction=0.2),
            finetune=FinetuneConfig(epochs=0, workers=0, progress=False),
        ),
        log=lambda message: None,
    )
    feature_set = read_features(extract.path)
    result = fit_cell(feature_set, Cell(head="linear", loss="ce", sampler="instance"), keep_head=True)
    return save_cell(feature_set, result, work / "bench.pt").path


def bare_loop(model, paths: List[str], *, batch_size: int) -> Tuple[float, List[int]]:
    """The few lines anyone would write; (images/s, top-1 class index per image)."""
    started = time.perf_counter()
    transform = model.transform()
    top1: List[int] = []
    for start in range(0, len(paths), batch_size):
        batch = paths[start:start + batch_size]
        images = torch.stack([transform(Image.open(path).convert("RGB")) for path in batch])
        with torch.inference_mode():
            logits = model(images)
        values, indices = torch.softmax(logits, dim=1).topk(5, dim=1)
        top1.extend(indices[:, 0].tolist())
    return len(paths) / (time.perf_counter() - started), top1


def predict_run(model, folder: Path, out: Path, *, batch_size: int) -> Tuple[float, int]:
    """``decouple predict``'s library path; (images/s, images classified)."""
    started = time.perf_counter()
    summary = write_predictions(
        model, collect_inputs([folder]), out, format="csv", top_k=5, batch_size=batch_size, device="cpu",
    )
    return summary.classified / (time.perf_counter() - started), summary.classified


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18", help="any timm model name (random init, offline)")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--count", type=int, default=2000, help="test images to classify (a multiple of 10)")
    parser.add_argument("--batch-size", type=int, default=64, help="both sides (64 is decouple predict's default)")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of each, alternating, after a warm-up")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--train-per-class", type=int, default=20, help="training images per class for the model")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of one predict run")
    args = parser.parse_args()
    if args.count % CLASSES or not 0 < args.count <= 10000:
        parser.error(f"--count must be a multiple of {CLASSES} in (0, 10000]; got {args.count}")
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        began = time.perf_counter()
        root = unpack_cifar(work, test_per_class=args.count // CLASSES, train_per_class=args.train_per_class)
        test_dir, train_dir = root / "test", root / "train"
        unpacked = time.perf_counter()
        model_path = build_model(train_dir, work, backbone=args.backbone, img_size=args.img_size)
        built = time.perf_counter()
        model = load_model(model_path)
        paths = [item.ref for item in collect_inputs([test_dir])]
        out = work / "predictions.csv"

        print(f"machine: {cpu_model()}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
              f"{torch.get_num_threads()} torch threads, python {platform.python_version()}")
        print(f"settings: {args.backbone} (random init, frozen) at {model.input_size[-1]} px, "
              f"{model_path.stat().st_size / 2**20:.1f} MiB model file, {len(paths)} CIFAR-10 test JPEGs, "
              f"batch {args.batch_size}, top-5, cpu, predict workers 0, CSV out, "
              f"1 warm-up + {args.rounds} alternating rounds")
        print(f"setup: unpack {unpacked - began:.1f} s, extract + head + save {built - unpacked:.1f} s; "
              f"1-min load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")

        _, bare_top1 = bare_loop(model, paths, batch_size=args.batch_size)
        predict_run(model, test_dir, out, batch_size=args.batch_size)
        bare_rates, predict_rates = [], []
        for round_index in range(1, args.rounds + 1):
            bare_rate, _ = bare_loop(model, paths, batch_size=args.batch_size)
            bare_rates.append(bare_rate)
            predict_rate, classified = predict_run(model, test_dir, out, batch_size=args.batch_size)
            predict_rates.append(predict_rate)
            print(f"round {round_index}: bare {bare_rate:8.1f} img/s   predict {predict_rate:8.1f} img/s   "
                  f"ratio {predict_rate / bare_rate:.3f}   (1-min load average {os.getloadavg()[0]:.2f})")

        # Both sides must have classified the same images the same way.
        with open(out, encoding="utf-8") as handle:
            rows = handle.read().splitlines()[1:]
        predicted = [row.split(",")[1] for row in rows]
        agree = sum(model.class_names[index] == name for index, name in zip(bare_top1, predicted))
        print(f"check: predict classified {classified}/{len(paths)}; top-1 equal to the bare loop's on "
              f"{agree}/{len(paths)}")

        bare, ours = statistics.median(bare_rates), statistics.median(predict_rates)
        ratio = ours / bare
        print(f"median: bare {bare:8.1f} img/s   predict {ours:8.1f} img/s   ratio {ratio:.3f} "
              f"(target >= 0.90): {'ok' if ratio >= 0.9 else 'MISSED'}")

        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            predict_run(model, test_dir, out, batch_size=args.batch_size)
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(25)
            print("cProfile of one predict run (cumulative):")
            print(text.getvalue())
        ok = ratio >= 0.9 and agree == len(paths) and classified == len(paths)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
