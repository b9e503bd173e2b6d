"""Post-hoc logit adjustment against its cross-entropy base on the CIFAR-10-LT features.

Fits the linear head and the ``posthoc_la`` head (Menon et al., ICLR 2021:
the same linear head, logits minus tau log pi_y, tau chosen on val), both
with cross-entropy and instance sampling, seeds 0-2, on the 40-epoch
CIFAR-10-LT features that ``bash benchmarks/cifar10_lt/run.sh 40`` (IF =
100) and ``IMBALANCE=50 bash benchmarks/cifar10_lt/run.sh 40`` write, and
prints the seed means (in %) and the gain on the balanced test set. The
paper reports +5.9 points (71.4 -> 77.3) at IF = 100.

    .venv/bin/python benchmarks/posthoc_la.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from decouple.features import read_features
from decouple.stage_two.cells import Cell
from decouple.stage_two.fit import fit_cells

FEATURES = Path(__file__).resolve().parent / "cifar10_lt" / "work" / "features"
RUNS = {100: "cifar10_lt_if100_e40", 50: "cifar10_lt_if50_e40"}
METRICS = (("test", "top1"), ("test", "macro_f1"), ("test_lt", "top1"), ("test_lt", "mean_class_acc"),
           ("test_lt", "macro_f1"))


def main() -> int:
    print(f"{'IF':>4} {'head':<12} " + " ".join(f"{split + ' ' + metric:>22}" for split, metric in METRICS)
          + "  tau (val)")
    for imbalance, run in RUNS.items():
        path = FEATURES / f"{run}.h5"
        if not path.is_file():
            print(f"{path}: not found; make it with `IMBALANCE={imbalance} bash benchmarks/cifar10_lt/run.sh 40`",
                  file=sys.stderr)
            continue
        results = fit_cells(read_features(path), [Cell(head, "ce", "instance", seed)
                                                  for head in ("linear", "posthoc_la") for seed in (0, 1, 2)])
        means = {}
        for head in ("linear", "posthoc_la"):
            cells = [result for result in results if result.head == head]
            means[head] = [100 * np.mean([cell.metrics[split][metric] for cell in cells]) for split, metric in METRICS]
            taus = [cell.params.get("tau") for cell in cells]
            print(f"{imbalance:>4} {head:<12} " + " ".join(f"{value:>22.1f}" for value in means[head])
                  + ("" if head == "linear" else f"  {taus}"))
        print(f"{'':>4} gain on balanced test top-1: {means['posthoc_la'][0] - means['linear'][0]:+.1f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
