"""Issue 12's stage-two methods against their bases on the CIFAR-10-LT features.

Fits, with seeds 0-2 on the 40-epoch CIFAR-10-LT features that ``bash
benchmarks/cifar10_lt/run.sh 40`` (IF = 100) and ``IMBALANCE=50 bash
benchmarks/cifar10_lt/run.sh 40`` write:

* ``posthoc_la`` (Menon et al., ICLR 2021: the linear head's logits minus
  tau log pi_y, tau chosen on val) against its base, ``linear`` / ``ce``;
  the paper reports +5.9 points (71.4 -> 77.3) at IF = 100;
* ``label_aware_smoothing`` (Zhong et al., MiSLAS, CVPR 2021) with the
  class-balanced sampling of the authors' second stage, against ``ce`` with
  the same sampler and with instance sampling;

and prints the seed means (in %; NLL in nats) on the balanced test set and
on test_lt, with each method's val choice.

    .venv/bin/python benchmarks/new_methods.py
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
METHODS = (("linear", "ce", "instance"), ("posthoc_la", "ce", "instance"), ("linear", "ce", "class_balanced"),
           ("linear", "label_aware_smoothing", "class_balanced"), ("linear", "label_aware_smoothing", "instance"))
COLUMNS = (("test", "top1"), ("test", "macro_f1"), ("test", "ece_raw"), ("test", "ece"), ("test", "nll_raw"),
           ("test_lt", "top1"), ("test_lt", "mean_class_acc"), ("test_lt", "macro_f1"))


def main() -> int:
    header = " ".join(f"{split} {metric}".rjust(16) for split, metric in COLUMNS)
    print(f"{'IF':>4} {'method':<52} {header}  val choice")
    for imbalance, run in RUNS.items():
        path = FEATURES / f"{run}.h5"
        if not path.is_file():
            print(f"{path}: not found; make it with `IMBALANCE={imbalance} bash benchmarks/cifar10_lt/run.sh 40`",
                  file=sys.stderr)
            continue
        results = fit_cells(read_features(path), [Cell(*method, seed) for method in METHODS for seed in (0, 1, 2)])
        for method in METHODS:
            cells = [result for result in results if (result.head, result.loss, result.sampler) == method]
            values = []
            for split, metric in COLUMNS:
                mean = np.mean([cell.metrics[split][metric] for cell in cells])
                values.append(f"{mean:16.3f}" if metric == "nll_raw" else f"{100 * mean:16.1f}")
            choice = [cell.params.get("tau") for cell in cells] if method[0] == "posthoc_la" else ""
            print(f"{imbalance:>4} {' / '.join(method):<52} {' '.join(values)}  {choice or ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
