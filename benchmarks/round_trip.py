"""Round trip: extract -> sweep -> save-model -> predict on image files gives the sweep's test top-1.

What it runs, through the ``decouple`` CLI (subprocesses, as a user would),
in a temporary folder, on real images: CIFAR-10 JPEGs unpacked from
../shared/data/cifar10-jpg.tar.xz (``--train-per-class`` + ``--val-per-class``
training images per class, made long-tailed by ``--imbalance``; ``--test-per-class``
test images per class):

1. ``decouple extract`` (``--backbone``, default decouple's CIFAR ResNet-32,
   a few fine-tuning epochs; float16 feature cache, RUN.manifest.csv beside it);
2. ``decouple sweep`` of a config this script writes: heads linear, tau_norm,
   cosine, ncm x losses ce, balanced_softmax x sampler instance x seed 0;
3. ``decouple save-model --db ... -o best.pt`` (the val-best cell), and
   ``decouple head --head H --save-model H.pt`` for H in linear, tau_norm, ncm;
4. ``decouple predict X.pt RUN.manifest.csv --split test --format jsonl`` for
   each model file: the test images, read from their JPEG files again.

What it checks, per model file: the top-1 of ``predict`` on the test images
equals the test top-1 recorded in the model file (the cell's score on the
cached features, as the sweep scored it) within 0.3 points or 2 images,
whichever is more. It also prints the sweep database's test top-1 for the
same cell, and counts the test images whose prediction flips between

- the cached float16 features (``model.scorer`` on /test/features), and
- the image files (``predict``), and
- float32 embeddings of the same files (``model.embed``, then ``model.scorer``),

which separates the float16 rounding of the cache from anything else (a
different decode, resize or normalisation would flip images between the
float32 embeddings and the cache by far more than rounding does).
Exit code 0 when every model passes, 1 otherwise.

    .venv/bin/python benchmarks/round_trip.py                 # ~3 min on 2 CPU cores
    .venv/bin/python benchmarks/round_trip.py --epochs 8 --keep /tmp/round_trip
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cifar_jpegs import unpack_cifar  # noqa: E402

HEADS = ("linear", "tau_norm", "cosine", "ncm")
LOSSES = ("ce", "balanced_softmax")
SAVED_HEADS = ("linear", "tau_norm", "ncm")
TOLERANCE_POINTS = 0.3
TOLERANCE_IMAGES = 2


def decouple_command() -> List[str]:
    """The installed ``decouple`` script beside this Python, else ``python -m cli.main``."""
    script = Path(sys.executable).parent / "decouple"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "cli.main"]


def run_cli(args: Sequence[str], *, cwd: Path) -> subprocess.CompletedProcess:
    """Run one decouple command; print it with its time and stderr's last lines; stop on failure."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    started = time.perf_counter()
    done = subprocess.run(decouple_command() + list(args), cwd=cwd, env=env, capture_output=True, text=True)
    print(f"$ decouple {' '.join(args)}   [{time.perf_counter() - started:.1f} s, exit {done.returncode}]")
    for line in done.stderr.strip().splitlines()[-4:]:
        print(f"    {line}")
    if done.returncode != 0:
        print(done.stdout[-2000:])
        raise SystemExit(f"decouple {args[0]} failed with exit code {done.returncode}")
    return done


def sweep_config(features: str, db: str) -> str:
    return "\n".join([
        "# written by benchmarks/round_trip.py",
        "features:",
        f"  - path: {features}",
        "grid:",
        f"  head: [{', '.join(HEADS)}]",
        f"  loss: [{', '.join(LOSSES)}]",
        "  sampler: [instance]",
        "  seed: [0]",
        f"db: {db}",
        "",
    ])


def sweep_top1(records, method: Dict) -> Optional[float]:
    """The sweep database's test top-1 of the cell ``method`` names, if the sweep ran it."""
    for record in records:
        if (record.head, record.loss, record.sampler, int(record.seed)) == (
            method["head"], method["loss"], method["sampler"], int(method["seed"])
        ):
            return record.metrics.get("test", {}).get("top1")
    return None


def embed_images(model, paths: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
    """float32 embeddings (N, D) of image files, the model's own transform."""
    import torch
    from PIL import Image

    transform = model.transform()
    blocks = []
    with torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            images = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[start:start + batch_size]])
            blocks.append(model.embed(images).float().numpy())
    return np.concatenate(blocks)


def argmax_scores(model, features: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return model.scorer(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))).argmax(1).numpy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet32_cifar",
                        help="timm name (resnet32_cifar: decouple's CIFAR ResNet-32)")
    parser.add_argument("--train-per-class", type=int, default=200, help="n_max of the long-tailed profile")
    parser.add_argument("--val-per-class", type=int, default=20)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--imbalance", type=float, default=10)
    parser.add_argument("--epochs", type=int, default=4, help="stage-one fine-tuning epochs")
    parser.add_argument("--batch-size", type=int, default=64, help="stage-one batch size")
    parser.add_argument("--keep", default=None, metavar="DIR",
                        help="work here and keep the files (default: a temp dir)")
    args = parser.parse_args()

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="round_trip_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return round_trip(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def round_trip(args: argparse.Namespace, work: Path) -> int:
    import torch

    from decouple.deploy.model import load_model
    from decouple.deploy.model_file import read_model_file
    from decouple.features import read_features
    from decouple.study.store import load_records

    began = time.perf_counter()
    data = unpack_cifar(work, train_per_class=args.train_per_class + args.val_per_class, test_per_class=args.test_per_class)
    print(f"data: {data} ({args.train_per_class + args.val_per_class} train and {args.test_per_class} test JPEGs "
          f"per class, unpacked in {time.perf_counter() - began:.1f} s); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    features = "features/cifar10_lt.h5"
    manifest = "features/cifar10_lt.manifest.csv"
    run_cli(["extract", "--data", str(data), "--backbone", args.backbone, "--imbalance", f"{args.imbalance:g}",
             "--n-max", str(args.train_per_class), "--val-per-class", str(args.val_per_class),
             "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--workers", "0",
             "--device", "cpu", "--out", features, "--no-progress"], cwd=work)
    (work / "sweep.yaml").write_text(sweep_config(features, "results.db"))
    run_cli(["sweep", "sweep.yaml", "--device", "cpu", "--no-progress"], cwd=work)
    models = {"best": "best.pt"}
    run_cli(["save-model", "--db", "results.db", "-o", models["best"]], cwd=work)
    for head in SAVED_HEADS:
        models[head] = f"{head}.pt"
        run_cli(["head", "--features", features, "--head", head, "--device", "cpu", "--save-model", models[head]],
                cwd=work)
    for name, path in models.items():
        run_cli(["predict", path, manifest, "--split", "test", "--format", "jsonl", "-o", f"{name}.jsonl",
                 "--device", "cpu", "--no-progress"], cwd=work)

    cached = read_features(work / features).splits["test"]  # float16 on disk, float32 here (exact)
    records = load_records(work / "results.db")
    embeddings: Dict[str, np.ndarray] = {}
    print()
    print(f"test split: {len(cached)} images; tolerance {TOLERANCE_POINTS} points or {TOLERANCE_IMAGES} images, "
          f"whichever is more; flips are images whose top-1 differs")
    header = (f"{'model':<9} {'method':<32} {'file':>6} {'sweep':>6} {'cached':>6} {'predict':>7} {'diff':>6} "
              f"{'flips':>14} {'flips':>13} {'flips':>14}  result")
    print(header)
    print(f"{'':<9} {'':<32} {'top-1':>6} {'top-1':>6} {'top-1':>6} {'top-1':>7} {'points':>6} "
          f"{'predict/cached':>14} {'predict/fp32':>13} {'fp32/cached':>14}")
    failures = 0
    notes = []
    for name, path in models.items():
        model_file = read_model_file(work / path)
        meta = model_file.meta
        model = load_model(work / path)
        rows = [json.loads(line) for line in (work / f"{name}.jsonl").read_text().splitlines()]
        names = model.class_names
        labels = np.array([names.index(row["label"]) for row in rows])
        if len(rows) != len(cached) or not np.array_equal(labels, cached.labels):
            raise SystemExit(f"{name}: predict's test rows do not line up with the feature file's test split")
        predicted = np.array([names.index(row["labels"][0]) for row in rows])
        weights = meta["backbone"]["weights_sha256"]
        if weights not in embeddings:
            embeddings[weights] = embed_images(model, [row["path"] for row in rows])
        fp32 = embeddings[weights]
        from_cache = argmax_scores(model, cached.features)
        from_fp32 = argmax_scores(model, fp32)

        recorded = float(meta["metrics"]["test"]["top1"])
        in_sweep = sweep_top1(records, meta["method"])
        cached_top1 = float((from_cache == labels).mean())
        predict_top1 = float((predicted == labels).mean())
        diff_images = int((predicted == labels).sum()) - int(round(recorded * len(labels)))
        ok = abs(diff_images) <= max(TOLERANCE_IMAGES, TOLERANCE_POINTS / 100 * len(labels))
        failures += not ok
        method = meta["method"]
        label = " / ".join(str(part) for part in (method["head"], method["loss"], method["sampler"]) if part)
        print(f"{name:<9} {label:<32} {100 * recorded:6.1f} "
              f"{'-' if in_sweep is None else f'{100 * in_sweep:.1f}':>6} {100 * cached_top1:6.1f} "
              f"{100 * predict_top1:7.1f} {100 * (predict_top1 - recorded):+6.1f} "
              f"{int((predicted != from_cache).sum()):>14} {int((predicted != from_fp32).sum()):>13} "
              f"{int((from_fp32 != from_cache).sum()):>14}  {'pass' if ok else 'FAIL'} ({diff_images:+d} images)")
        if in_sweep is not None and abs(in_sweep - recorded) > 1e-9:
            notes.append(f"{name}: the model file records test top-1 {recorded}, the sweep {in_sweep}")
        if abs(cached_top1 - recorded) > 1e-9:
            notes.append(f"{name}: model.scorer on the cached features scores {cached_top1}, "
                         f"the file records {recorded}")

    for weights, fp32 in embeddings.items():
        rounded = fp32.astype(np.float16).astype(np.float32)
        error = np.abs(fp32 - cached.features)
        scale = np.abs(fp32).max(axis=1, keepdims=True)
        print(f"\nembeddings of backbone {weights[:12]}: float32 from the files vs the float16 cache: "
              f"max |diff| {error.max():.3g} (relative to each row's largest value: {(error / scale).max():.2e}); "
              f"{int((rounded == cached.features).all(axis=1).sum())}/{len(fp32)} rows equal once rounded to "
              f"float16, {int((rounded == cached.features).sum())}/{rounded.size} values")
    for note in notes:
        print(f"note: {note}")
    print(f"\n{len(models) - failures}/{len(models)} models pass; total {time.perf_counter() - began:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
