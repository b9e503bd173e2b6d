"""Stage-two training speed: our fused trainer against a bare PyTorch loop.

Data: ``gaussian_long_tailed(num_classes=100, dim=2048, n_max=500,
imbalance_factor=100)``: 10,847 x 2048 float32 training features over 100
classes (exponential profile), balanced val and test.

1. One linear head, cross-entropy, instance sampling, the default budget
   (28 epochs of 22 steps here), through :func:`decouple.stage_two.trainer.train_heads`
   (standardisation, cosine schedule, val scoring after every epoch and
   epoch choice included) beside a bare loop doing the same training (same
   batches from the same sampler, ``nn.Linear``, the same optimizer with
   weight decay on the weights, cosine schedule, ``F.cross_entropy``) in
   the same process; the ratio ours / bare, once with val scored after every
   epoch in both (the work stage two does to choose the epoch), once
   training only.
2. Fused training: the 8 losses with linear heads on one sampler in one
   pass, against 8 single-head passes.
3. The whole grid 8 losses x 4 samplers, linear heads, through fit_cells
   (training, selection and scoring of val and test).

Usage: python benchmarks/stage_two.py [--epochs N] [--threads N] [--skip-grid] [--repeats 2]
       [--precision float32|bfloat16|auto]   (ours only; the bare loop stays float32)
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from decouple.stage_two.losses import create_loss, list_losses
from decouple.stage_two.samplers import create_sampler, list_samplers
from decouple.stage_two.cells import Cell
from decouple.stage_two.config import TrainConfig
from decouple.stage_two.fit import fit_cells
from decouple.stage_two.heads import LinearFamily
from decouple.stage_two.trainer import PreparedData, train_heads
from decouple.synthetic import gaussian_long_tailed


def bare_loop(features: np.ndarray, labels: np.ndarray, sampler, config: TrainConfig,
              val_features=None, val_labels=None) -> torch.nn.Linear:
    """The textbook loop: nn.Linear, the configured optimizer (fused Adam by
    default, as ours), cosine schedule, cross-entropy; with val arrays, also
    val accuracy after every epoch and a copy of the best weights."""
    torch.manual_seed(0)
    x = torch.from_numpy(features)
    y = torch.from_numpy(labels)
    best, best_state = -1.0, None
    model = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    groups = [{"params": [model.weight], "weight_decay": config.weight_decay},
              {"params": [model.bias], "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    else:
        kind = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
        optimizer = kind(groups, lr=config.lr, fused=True)
    total_steps = config.epochs * math.ceil(len(y) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
    )
    for epoch in range(config.epochs):
        sampler.set_epoch(epoch)
        order = sampler.epoch_indices()
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        if val_features is not None:
            with torch.no_grad():
                accuracy = float((model(torch.from_numpy(val_features)).argmax(1)
                                  == torch.from_numpy(val_labels)).float().mean())
            if accuracy > best:
                best, best_state = accuracy, {k: v.clone() for k, v in model.state_dict().items()}
    return model


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="fixed epochs (default: the default budget)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip-grid", action="store_true", help="skip the 8 x 4 grid")
    parser.add_argument("--repeats", type=int, default=2, help="timings per variant in part 1 (best kept)")
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "auto"],
                        help="TrainConfig.precision of our trainer (the bare loop is float32)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    feature_set, _ = gaussian_long_tailed(num_classes=100, dim=2048, n_max=500, imbalance_factor=100)
    train, val = feature_set.splits["train"], feature_set.splits["val"]
    config = TrainConfig(epochs=args.epochs, device="cpu", precision=args.precision).validated().for_rows(len(train))
    counts = feature_set.train_counts
    print(
        f"data: train {train.features.shape[0]} x {train.features.shape[1]} float32, "
        f"{feature_set.num_classes} classes, val {len(val)}; {config.epochs} epochs, "
        f"batch {config.batch_size}, {config.optimizer} lr {config.lr:g}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, cpu; "
        f"ours in {config.precision}"
    )

    def sampler(name: str = "instance", epochs: int = config.epochs):
        return create_sampler(name, train.labels, total_epochs=epochs, seed=0)

    # Warm up both paths (allocator, kernels) on one epoch.
    warm = TrainConfig(epochs=1, device="cpu", precision=config.precision)
    data = PreparedData.from_arrays(train.features, train.labels, val_features=val.features,
                                    val_labels=val.labels, device="cpu")
    train_heads(data, [create_loss("ce", class_counts=counts)], sampler=sampler(epochs=1), family=LinearFamily(), train=warm)
    bare_loop(train.features, train.labels, sampler(epochs=1), warm.validated())

    # 1. One head: ours beside the bare loop, alternated, best of `repeats`;
    #    with val scoring after every epoch in both, and without val in both.
    def ours(with_val: bool):
        prepared = PreparedData.from_arrays(
            train.features, train.labels, device="cpu",
            val_features=val.features if with_val else None, val_labels=val.labels if with_val else None,
        )
        return train_heads(prepared, [create_loss("ce", class_counts=counts)], sampler=sampler(), family=LinearFamily(), train=config)

    for with_val in (True, False):
        ours_times, bare_times = [], []
        for _ in range(args.repeats):
            ours_times.append(timed(ours, with_val)[1])
            val_arrays = (val.features, val.labels) if with_val else (None, None)
            bare_times.append(timed(bare_loop, train.features, train.labels, sampler(), config, *val_arrays)[1])
        ours_s, bare_s = min(ours_times), min(bare_times)
        what = "with val scoring + best-epoch copy every epoch" if with_val else "training only, no val"
        print(f"1 linear head, ce, instance, {what}: ours {ours_s:.2f} s, bare PyTorch loop {bare_s:.2f} s, "
              f"ratio {ours_s / bare_s:.2f} (target <= 1.3)")

    # 2. Fused: 8 losses on one sampler in one pass vs 8 passes.
    loss_names = [name for name, _ in list_losses()]
    losses = [create_loss(name, class_counts=counts) for name in loss_names]
    _, fused_s = timed(train_heads, data, losses, sampler=sampler(), family=LinearFamily(), train=config)
    separate_s = 0.0
    for loss in losses:
        _, seconds = timed(train_heads, data, [loss], sampler=sampler(), family=LinearFamily(), train=config)
        separate_s += seconds
    print(f"{len(losses)} linear heads ({', '.join(loss_names)}), instance: fused {fused_s:.2f} s, "
          f"separate {separate_s:.2f} s, speed-up {separate_s / fused_s:.2f}x")

    # 3. The grid through fit_cells.
    if not args.skip_grid:
        sampler_names = [name for name, _ in list_samplers()]
        cells = [Cell("linear", loss, sampler) for sampler in sampler_names for loss in loss_names]
        results, grid_s = timed(fit_cells, feature_set, cells, train=config)
        print(f"grid {len(loss_names)} losses x {len(sampler_names)} samplers = {len(cells)} linear cells "
              f"via fit_cells: {grid_s:.2f} s (target <= 60 s on 2 CPU cores)")
        best = max(results, key=lambda result: result.metrics["val"]["mean_class_acc"])
        print(f"  val-best cell ({best.loss}, {best.sampler}): test top1 {best.metrics['test']['top1']:.3f}; "
              f"ce/instance {results[0].metrics['test']['top1']:.3f}")


if __name__ == "__main__":
    main()
