"""The GPU path, one line per check (issue 13, item 4): prepared here, run
on a machine with one NVIDIA GPU.

Here (no GPU needed), write the data the machine cannot reach into a
folder that travels with the working tree (the CIFAR-10-LT training images
of the IF = 100 profile plus 20 a class for val, and 200 test images a
class: 4.4 MB), and check the script on the CPU:

    echo /.gpu_data/ >> .git/info/exclude
    .venv/bin/python benchmarks/gpu_check.py --prepare .gpu_data/cifar10_lt.tar.xz
    .venv/bin/python benchmarks/gpu_check.py --data .gpu_data/cifar10_lt.tar.xz --smoke

There (its image has torch, timm, h5py, click and scikit-learn, not faiss:
carry a faiss wheel as the device README says; carry `.gpu_data`):

    PYTHONPATH=. PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --data .gpu_data/cifar10_lt.tar.xz

Checks, each one line, a failure printed and the next check run:

* ``finetune``: `decouple extract` of CIFAR-10-LT (IF = 100) with a
  CIFAR ResNet-32, bf16 autocast, channels_last and the decoded images in
  GPU memory (``--cache-images device``), ``--epochs`` epochs:
  training img/s, the embedding time of every split, then a linear / ce
  head on the features and its balanced test top-1;
* ``ncm``: 5,000 classes scored on the GPU, against the CPU;
* ``knn``: the FAISS GPU index against the CPU one (a clear skip line with
  ``faiss-cpu``);
* ``torchrun``: `torchrun --nproc_per_node=1` extraction with NCCL;
* ``stage two``: the CIFAR-10-LT grid of linear heads, every loss x
  sampler, in bfloat16 against float32 (time and mean test top-1).

``--smoke`` runs every check on whatever device there is, small: it tests
the script, not the GPU (on the 2-core development machine: every line
printed, knn and torchrun skipped, in about a minute).

Size: everything git tracks travels (35.0 MB at this writing, 24.5 MB of
it the CIFAR-10-LT IF = 100 results database). With the prepared data and
the faiss-cpu wheel (23.8 MB; `decouple.stage_two.heads` imports faiss) it
is 63.3 MB, just under the device's 64 MiB (67.1 MB): the whole 18.5 MB
tarball would not fit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

import faiss
import numpy as np
import torch
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli.main import cli  # noqa: E402
from decouple.features import read_features  # noqa: E402
from decouple.stage_two.cells import Cell  # noqa: E402
from decouple.stage_two.config import TrainConfig  # noqa: E402
from decouple.stage_two.fit import fit_cells  # noqa: E402
from decouple.stage_two.heads import create_head, search_device  # noqa: E402
from decouple.stage_two.losses import LOSSES  # noqa: E402
from decouple.stage_two.samplers import SAMPLERS  # noqa: E402


def unpack(tarball: Path, dest: Path, per_class: int = 0) -> Path:
    """cifar10/{train,test}/<class>/*.jpg from the JPEG tarball (``per_class``
    > 0: the first that many of each class and split)."""
    wanted = None if per_class <= 0 else {f"{i:04d}.jpg" for i in range(per_class)}
    with tarfile.open(tarball, "r:xz") as archive:
        members = [m for m in archive if m.isfile() and (wanted is None or Path(m.name).name in wanted)]
        archive.extractall(dest, members=members, filter="data")
    return dest / "cifar10"


#: Val images a class; the smoke run's 30 images a class leave room for 5.
VAL_PER_CLASS = {"full": 20, "smoke": 5}


def prepare(source: Path, out: Path, *, imbalance: float = 100, val_per_class: int = 20,
            test_per_class: int = 200) -> None:
    """Write ``out`` (tar.xz): per class (in name order) the first
    round(n_max (1 / imbalance)^(i / (C - 1))) + ``val_per_class`` training
    JPEGs, n_max = 5000 - ``val_per_class`` (the profile `decouple extract
    --imbalance` draws from the full set), and ``test_per_class`` test JPEGs."""
    with tarfile.open(source, "r:xz") as archive:
        members = [m for m in archive if m.isfile() and m.name.endswith(".jpg")]
        classes = sorted({Path(m.name).parent.name for m in members})
        n_max = 5000 - val_per_class
        keep = {name: int(round(n_max * (1.0 / imbalance) ** (index / (len(classes) - 1)))) + val_per_class
                for index, name in enumerate(classes)}
        out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(out, "w:xz") as written:
            for member in members:
                path = Path(member.name)
                limit = keep[path.parent.name] if path.parent.parent.name == "train" else test_per_class
                if int(path.stem) < limit:
                    written.addfile(member, archive.extractfile(member))


def extract_args(data: Path, out: Path, *, epochs: int, device: str, name: str, val_per_class: int = 20) -> list:
    return ["extract", "--data", str(data), "--backbone", "resnet32_cifar", "--imbalance", "100",
            "--val-per-class", str(val_per_class),
            "--epochs", str(epochs), "--batch-size", "128", "--lr", "0.1", "--momentum", "0.9",
            "--weight-decay", "2e-4", "--warmup-epochs", "1", "--device", device, "--amp", "--channels-last",
            "--cache-images", "device" if device == "cuda" else "memory",
            "--features-dir", str(out), "--name", name, "--no-check", "--no-progress", "--json"]


def check_finetune(data: Path, work: Path, *, epochs: int, device: str, val_per_class: int) -> str:
    started = time.perf_counter()
    result = CliRunner().invoke(cli, extract_args(data, work / "features", epochs=epochs, device=device, name="lt",
                                                  val_per_class=val_per_class))
    seconds = time.perf_counter() - started
    if result.exit_code != 0:
        raise RuntimeError(result.output[-2000:])
    run = json.loads(result.stdout.splitlines()[-1])
    history = run["history"]
    train_seconds = sum(epoch["seconds"] for epoch in history)
    rate = np.mean([epoch["images_per_second"] for epoch in history[1:] or history])
    features = read_features(run["path"])
    head = fit_cells(features, [Cell("linear", "ce", "instance", 0)], train=TrainConfig(device=device))[0]
    return (f"finetune: resnet32_cifar, CIFAR-10-LT IF=100, {len(history)} epochs, {'bf16 + channels_last + device cache' if device == 'cuda' else 'float32 + memory cache'} on "
            f"{device}: {rate:.0f} img/s training (after epoch 1), {train_seconds:.1f} s training, "
            f"{seconds - train_seconds:.1f} s for the rest (every split embedded: {sum(run['splits'].values())} "
            f"images); linear/ce test top-1 {100 * head.metrics['test']['top1']:.1f}%")


def check_ncm(*, smoke: bool) -> str:
    rng = np.random.default_rng(0)
    num_classes, dim = (500 if smoke else 5000), 256
    means = rng.standard_normal((num_classes, dim)).astype(np.float32) * 3
    labels = np.repeat(np.arange(num_classes), 4)
    features = means[labels] + rng.standard_normal((len(labels), dim)).astype(np.float32)
    queries = means + rng.standard_normal(means.shape).astype(np.float32)
    head = create_head("ncm").fit(features, labels)
    started = time.perf_counter()
    scores = head.decision_function(queries)
    seconds = time.perf_counter() - started
    reference = queries / np.linalg.norm(queries, axis=1, keepdims=True) @ head.means_.T
    agree = float((scores.argmax(1) == reference.argmax(1)).mean())
    return (f"ncm: {num_classes} classes x {len(queries)} queries on {search_device()} in {seconds:.3f} s; "
            f"argmax agrees with the CPU product on {100 * agree:.1f}%, max |diff| {np.abs(scores - reference).max():.1e}")


def check_knn(*, smoke: bool) -> str:
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if gpus == 0:
        return "knn: skipped, this FAISS build sees no GPU (faiss-cpu): the GPU index is untested"
    rng = np.random.default_rng(1)
    bank = rng.standard_normal((20_000 if not smoke else 2_000, 128)).astype(np.float32)
    labels = rng.integers(0, 100, len(bank))
    queries = rng.standard_normal((2_000, 128)).astype(np.float32)
    head = create_head("knn").fit(bank, labels)
    on_gpu = head.decision_function(queries)
    cpu = faiss.IndexFlatIP(128)
    cpu.add(bank / np.linalg.norm(bank, axis=1, keepdims=True))
    _, ids = cpu.search(queries / np.linalg.norm(queries, axis=1, keepdims=True), 10)
    votes = np.zeros_like(on_gpu)
    np.add.at(votes, (np.repeat(np.arange(len(queries)), 10), labels[ids.reshape(-1)]), 1)
    agree = float((votes.argmax(1) == on_gpu.argmax(1)).mean())
    return f"knn: FAISS GPU index on {gpus} GPU(s); top class agrees with the CPU index's vote on {100 * agree:.1f}%"


def check_torchrun(data: Path, work: Path, *, device: str, val_per_class: int) -> str:
    if device != "cuda":
        return "torchrun: skipped, no CUDA device (NCCL needs one)"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "-m", "cli.main",
            *extract_args(data, work / "ddp", epochs=1, device="cuda", name="ddp", val_per_class=val_per_class)]
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    world = json.loads(done.stdout.strip().splitlines()[-1])["world_size"]
    return f"torchrun: --nproc_per_node=1, NCCL, 1 epoch + extraction in {time.perf_counter() - started:.1f} s, world size {world}"


def check_stage_two(work: Path, *, device: str) -> str:
    features = read_features(next((work / "features").glob("lt.h5")))
    cells = [Cell("linear", loss, sampler, 0) for loss in LOSSES.names() for sampler in SAMPLERS.names()]
    lines = []
    for precision in ("float32", "bfloat16"):
        started = time.perf_counter()
        results = fit_cells(features, cells, train=TrainConfig(device=device, precision=precision))
        top1 = np.mean([result.metrics["test"]["top1"] for result in results])
        lines.append(f"{precision} {time.perf_counter() - started:.1f} s, mean test top-1 {100 * top1:.2f}%")
    return f"stage two: {len(cells)} linear cells on {device}: " + "; ".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="the JPEG tarball: cifar10-jpg.tar.xz or what --prepare wrote")
    parser.add_argument("--prepare", metavar="OUT", help="write the CIFAR-10-LT subset tarball for the device, and stop")
    parser.add_argument("--source", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.tar.xz"),
                        help="with --prepare: the full CIFAR-10 JPEG tarball")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--smoke", action="store_true", help="small, on any device: test the script")
    args = parser.parse_args(argv)
    if args.prepare:
        prepare(Path(args.source), Path(args.prepare))
        print(f"wrote {args.prepare} ({Path(args.prepare).stat().st_size / 1e6:.1f} MB)")
        return 0
    if not args.data:
        parser.error("--data is required (or --prepare OUT)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name(0) if device == "cuda" else "no GPU"
    print(f"device: {device} ({name}); torch {torch.__version__}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="decouple-gpu-"))
    data = unpack(Path(args.data), work / "data", per_class=30 if args.smoke else 0)
    epochs = 1 if args.smoke else args.epochs
    val = VAL_PER_CLASS["smoke" if args.smoke else "full"]
    checks = [
        ("finetune", lambda: check_finetune(data, work, epochs=epochs, device=device, val_per_class=val)),
        ("ncm", lambda: check_ncm(smoke=args.smoke)),
        ("knn", lambda: check_knn(smoke=args.smoke)),
        ("torchrun", lambda: check_torchrun(data, work, device=device, val_per_class=val)),
        ("stage two", lambda: check_stage_two(work, device=device)),
    ]
    failed = 0
    for label, check in checks:
        try:
            print(check(), flush=True)
        except Exception as exc:  # one line per check, and the rest still run
            failed += 1
            print(f"{label}: FAILED: {type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}",
                  flush=True)
            traceback.print_exc(file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
