"""Sweep benchmark: the 8 losses x 4 samplers grid with linear heads, fused
versus one cell at a time.

Data: synthetic long-tailed Gaussian features shaped like CIFAR-100-LT
(imbalance 100) embeddings: 10,847 x 2048 float32 training rows over 100
classes, a balanced val (20 per class) and test (100 per class). Each run
is a full ``run_sweep`` (feature file read, 30 epochs per cell, val-based
epoch choice, scoring, one SQLite transaction per cell) into a fresh
database; "fused" trains the cells that share a sampler in one pass,
"one at a time" calls stage two once per cell.

    python benchmarks/sweep.py                    # both, 30 epochs, 2 threads
    python benchmarks/sweep.py --single-cells 2   # 2 single cells per sampler, scaled up (says so)

Fused and one-at-a-time runs alternate sampler by sampler (8 cells each),
so on a shared machine both see the same background load; wall and CPU
seconds are printed, and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the target is 2 cores)")
    parser.add_argument("--single-cells", type=int, default=None,
                        help="time only this many one-at-a-time losses per sampler and extrapolate (says so)")
    parser.add_argument("--repeat", type=int, default=1, help="keep the fastest of this many runs of each piece")
    parser.add_argument("--skip-single", action="store_true", help="only the fused run")
    parser.add_argument("--keep", default=None, metavar="DIR", help="keep the feature file and databases here")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from decouple.features import write_features
    from decouple.losses import LOSSES
    from decouple.samplers import SAMPLERS
    from decouple.synthetic import gaussian_long_tailed
    from decouple.sweep import parse_config, run_sweep

    work = Path(args.keep or tempfile.mkdtemp(prefix="decouple-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    features = work / "cifar100_lt_like.h5"
    if not features.exists():
        feature_set, _ = gaussian_long_tailed(
            num_classes=100, dim=2048, n_max=500, imbalance_factor=100, n_val=20, n_test=100, radius=3.0, seed=0
        )
        assert len(feature_set.splits["train"]) == 10847
        write_features(features, feature_set, dtype="float32")
    losses, samplers = LOSSES.names(), SAMPLERS.names()
    print(f"grid: linear head x {len(losses)} losses x {len(samplers)} samplers = "
          f"{len(losses) * len(samplers)} cells, {args.epochs} epochs each")
    print(f"data: train 10847 x 2048 float32, 100 classes; val 2000, test 10000")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads")

    def config(seed_list=(0,), loss_list=losses, sampler_list=samplers):
        return parse_config({
            "features": [str(features)],
            "grid": {"head": ["linear"], "loss": list(loss_list), "sampler": list(sampler_list),
                     "seed": list(seed_list)},
            "train": {"epochs": args.epochs, "device": "cpu"},
        })

    def timed(name, sweep_config, *, fuse):
        db = work / f"{name}.db"
        if db.exists():
            db.unlink()
        wall, cpu = time.perf_counter(), time.process_time()
        summary = run_sweep(sweep_config, db=str(db), fuse=fuse)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        assert summary.ran == summary.total, summary
        return wall, cpu, summary.total

    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    # The machine may be shared: fused and one-at-a-time runs alternate sampler by
    # sampler so that both see the same background load; each piece keeps its
    # fastest of --repeat runs.
    totals = {"fused": [0.0, 0.0, 0], "single": [0.0, 0.0, 0]}
    for sampler in samplers:
        for mode in ("fused", "single"):
            if mode == "single" and args.skip_single:
                continue
            loss_list = losses[: args.single_cells] if (mode == "single" and args.single_cells) else losses
            runs = [timed(f"{mode}_{sampler}", config(loss_list=loss_list, sampler_list=[sampler]),
                          fuse=(mode == "fused")) for _ in range(args.repeat)]
            wall, cpu, cells = min(runs)
            scale = len(losses) / len(loss_list)
            totals[mode][0] += wall * scale
            totals[mode][1] += cpu * scale
            totals[mode][2] += cells
            print(f"  {sampler:15s} {mode:7s} {cells} cells: {wall:6.1f} s wall, {cpu:6.1f} s CPU", flush=True)
    print(f"load average after:  {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    fused_wall, fused_cpu, cells = totals["fused"]
    print(f"fused:          {fused_wall:7.1f} s wall ({fused_cpu:.1f} s CPU) for {cells} cells "
          f"({fused_wall / cells:.2f} s per cell)")
    if args.skip_single:
        return 0
    single_wall, single_cpu, measured = totals["single"]
    note = f" (extrapolated from {measured} cells)" if measured < cells else ""
    print(f"one at a time:  {single_wall:7.1f} s wall ({single_cpu:.1f} s CPU) for {cells} cells "
          f"({single_wall / cells:.2f} s per cell){note}")
    print(f"ratio:          {single_wall / fused_wall:7.2f}x faster fused (wall), "
          f"{single_cpu / fused_cpu:.2f}x (CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
