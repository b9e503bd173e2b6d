"""Stage-one throughput: decouple's fine-tune loop and extraction against bare timm loops.

Same model, batch, input size, images, transforms and loader settings on both
sides; the bare loops are the few lines anyone would write (DataLoader ->
model -> cross-entropy -> SGD; DataLoader -> forward_head(pre_logits=True)).
Targets: fine-tune overhead at most 10%, extraction at least 0.9 of bare
inference. Runs alternate and the best of ``--repeats`` counts, since shared
machines are noisy.

    python benchmarks/stage_one.py                      # CPU: resnet18 at 32 px
    python benchmarks/stage_one.py --device cuda --img-size 224 --backbone resnet50
"""

from __future__ import annotations

import argparse
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decouple.stage_one.backbones import create_backbone, embed, embedding_dim  # noqa: E402
from decouple.features import FeatureWriter  # noqa: E402
from decouple.stage_one.distributed import DistInfo, resolve_device  # noqa: E402
from decouple.stage_one.extract import embed_split  # noqa: E402
from decouple.stage_one.finetune import FinetuneConfig, data_config_for, finetune, make_transform  # noqa: E402
from decouple.stage_one.images import ImageDataset  # noqa: E402
from decouple.stage_one.splits import SplitOptions, prepare_manifest  # noqa: E402

TARBALL = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.tar.xz"


def unpack_subset(per_class: int, dest: Path) -> Path:
    wanted = {f"{i:04d}.jpg" for i in range(per_class)}
    with tarfile.open(TARBALL, "r:xz") as archive:
        members = [m for m in archive if m.isfile() and "/train/" in m.name and Path(m.name).name in wanted]
        archive.extractall(dest, members=members, filter="data")
    return dest / "cifar10" / "train"


def bare_train(model, dataset, *, batch_size, workers, device, lr=0.05) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         drop_last=True, pin_memory=device.type == "cuda")
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    criterion = torch.nn.CrossEntropyLoss()
    model.train()
    seen, started = 0, time.perf_counter()
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        loss = criterion(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(labels)
    loss.item()
    return seen / (time.perf_counter() - started)


@torch.no_grad()
def bare_extract(model, dataset, *, batch_size, workers, device) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    model.eval()
    started, out = time.perf_counter(), []
    for images, _ in loader:
        out.append(embed(model, images.to(device)).cpu().numpy())
    np.concatenate(out)
    return len(dataset) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--per-class", type=int, default=150, help="training images per CIFAR-10 class")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        data = unpack_subset(args.per_class, Path(tmp))
        manifest = prepare_manifest(data, SplitOptions(val_fraction=0.0, min_val_per_class=0, test_fraction=0.0))
        train = manifest.splits["train"]
        model, _ = create_backbone(args.backbone, num_classes=manifest.num_classes)
        model.to(device)
        data_config = data_config_for(model, args.img_size)
        train_set = ImageDataset(train, make_transform(data_config, is_training=True))
        eval_set = ImageDataset(train, make_transform(data_config, is_training=False))
        dist = DistInfo(device=device)
        config = FinetuneConfig(epochs=1, batch_size=args.batch_size, workers=args.workers, progress=False,
                                warmup_epochs=0, amp=True, channels_last=True)
        ours_train, bare_train_rates, ours_extract, bare_extract_rates = [], [], [], []
        for _ in range(args.repeats):
            history = finetune(model, manifest, config, data_config=data_config, dist=dist, log=lambda m: None)
            ours_train.append(history[-1].images_per_second)
            bare_train_rates.append(bare_train(model, train_set, batch_size=args.batch_size, workers=args.workers, device=device))
            model.eval()
            with FeatureWriter(Path(tmp) / "bench.h5", class_names=manifest.class_names, backbone=args.backbone) as writer:
                writer.create_split("train", n=len(train), dim=embedding_dim(model))
                started = time.perf_counter()
                embed_split(model, train, eval_set.transform, dist=dist, batch_size=args.batch_size, workers=args.workers,
                            write=lambda start, block: writer.write_rows("train", start, block, train.labels[start:start + len(block)]))
                ours_extract.append(len(train) / (time.perf_counter() - started))
            bare_extract_rates.append(bare_extract(model, eval_set, batch_size=args.batch_size, workers=args.workers, device=device))
    train_ours, train_bare = max(ours_train), max(bare_train_rates)
    extract_ours, extract_bare = max(ours_extract), max(bare_extract_rates)
    overhead = 1 - train_ours / train_bare
    ratio = extract_ours / extract_bare
    print(f"stage one: {args.backbone} at {args.img_size} px, batch {args.batch_size}, {device}, "
          f"{torch.get_num_threads()} threads, {len(train)} images, workers {args.workers}, best of {args.repeats}")
    print(f"fine-tune: decouple {train_ours:8.1f} img/s   bare timm loop {train_bare:8.1f} img/s   "
          f"overhead {overhead:+.1%} (target <= 10%): {'ok' if overhead <= 0.10 else 'MISSED'}")
    print(f"extract:   decouple {extract_ours:8.1f} img/s   bare inference {extract_bare:8.1f} img/s   "
          f"ratio {ratio:.2f} (target >= 0.90): {'ok' if ratio >= 0.9 else 'MISSED'}")


if __name__ == "__main__":
    main()
