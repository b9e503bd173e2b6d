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
* ``disalign`` (Zhang et al., CVPR 2021: input-dependent magnitude and
  margin on the frozen ``linear`` / ``ce`` head, trained with generalized
  re-weighting) against its base, ``linear`` / ``ce``, and against ``lws``,
  the other learned post-fit step on that head;
* the ``calibrated_features`` sampler (Yang et al., ICLR 2021; TailCalib,
  ICVGIP 2021: tail classes topped up with features drawn from Gaussians
  calibrated on their nearest head classes) on ``linear`` / ``ce``, against
  instance sampling; with its default tail (under 20 images) it adds no
  row to these files (smallest classes 49 and 99 images), so it equals
  ``linear`` / ``ce`` / ``instance`` here;

* weight balancing (Alshammari et al., CVPR 2022: the ``class_balanced``
  loss with a per-class MaxNorm cap and a weight decay), its two settings
  chosen on val (mean val mean-class accuracy over the seeds, as
  ``recommend`` chooses) from max_norm 0.5, 1, 2 x weight decay 5e-4,
  5e-3, against ``linear`` / ``class_balanced`` without them;
* the deployment prior (LADE's prior correction, Hong et al., CVPR 2021):
  every cell also scores ``test_lt@train``, test_lt with its scores moved
  from the prior its method assumes to the training prior;

and prints the seed means (in %; NLL in nats) on the balanced test set and
on test_lt, each method's gain in test top-1 over ``linear`` / ``ce`` /
``instance``, and its val choice.

    .venv/bin/python benchmarks/new_methods.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from decouple.features import read_features
from decouple.stage_two.cells import Cell
from decouple.stage_two.config import TrainConfig
from decouple.stage_two.fit import fit_cells

FEATURES = Path(__file__).resolve().parent / "cifar10_lt" / "work" / "features"
RUNS = {100: "cifar10_lt_if100_e40", 50: "cifar10_lt_if50_e40"}
SEEDS = (0, 1, 2)
#: (label, head, loss, sampler, params): each method with its settings.
METHODS = (
    ("linear / ce / instance", "linear", "ce", "instance", {}),
    ("posthoc_la / ce / instance", "posthoc_la", "ce", "instance", {}),
    ("linear / ce / class_balanced", "linear", "ce", "class_balanced", {}),
    ("linear / label_aware_smoothing / class_balanced", "linear", "label_aware_smoothing", "class_balanced", {}),
    ("linear / label_aware_smoothing / instance", "linear", "label_aware_smoothing", "instance", {}),
    ("lws / ce / instance", "lws", "ce", "instance", {}),
    ("disalign / ce / instance", "disalign", "ce", "instance", {}),
    ("linear / ce / calibrated_features", "linear", "ce", "calibrated_features", {}),
    ("linear / ce / calibrated_features (tail_below=0.1)", "linear", "ce", "calibrated_features",
     {"calibrated_features": {"tail_below": 0.1}}),
    ("linear / balanced_softmax / instance", "linear", "balanced_softmax", "instance", {}),
    ("linear / class_balanced / instance", "linear", "class_balanced", "instance", {}),
)
#: Weight balancing's settings, chosen on val.
WEIGHT_BALANCING = [{"max_norm": norm, "weight_decay": decay} for norm in (0.5, 1.0, 2.0) for decay in (5e-4, 5e-3)]
#: The val choice printed for each post-fit head (params key).
CHOICES = {"posthoc_la": "tau", "lws": "scale_epoch", "disalign": "align_epoch"}
COLUMNS = (("test", "top1"), ("test", "macro_f1"), ("test", "ece_raw"), ("test", "ece"), ("test", "nll_raw"),
           ("test_lt", "top1"), ("test_lt@train", "top1"), ("test_lt", "mean_class_acc"))


def _mean(cells, split, metric):
    return float(np.mean([cell.metrics[split][metric] for cell in cells]))


def main() -> int:
    header = " ".join(f"{split} {metric}".rjust(18) for split, metric in COLUMNS)
    print(f"{'IF':>4} {'method':<62} {header} {'gain':>6}  val choice")
    for imbalance, run in RUNS.items():
        path = FEATURES / f"{run}.h5"
        if not path.is_file():
            print(f"{path}: not found; make it with `IMBALANCE={imbalance} bash benchmarks/cifar10_lt/run.sh 40`",
                  file=sys.stderr)
            continue
        methods = list(METHODS) + [
            (f"linear / class_balanced / instance (max_norm={setting['max_norm']}, "
             f"weight_decay={setting['weight_decay']})", "linear", "class_balanced", "instance", {"linear": setting})
            for setting in WEIGHT_BALANCING
        ]
        cells = [Cell(head, loss, sampler, seed, params) for _, head, loss, sampler, params in methods for seed in SEEDS]
        results = fit_cells(read_features(path), cells, train=TrainConfig(views=("test_lt@train",)))
        by_method = {label: results[index * len(SEEDS):(index + 1) * len(SEEDS)]
                     for index, (label, *_) in enumerate(methods)}
        balanced = [label for label, *_ in methods[len(METHODS):]]
        chosen = max(balanced, key=lambda label: _mean(by_method[label], "val", "mean_class_acc"))
        shown = [label for label, *_ in METHODS] + [chosen]
        base = _mean(by_method["linear / ce / instance"], "test", "top1")
        for label in shown:
            members = by_method[label]
            values = [f"{_mean(members, split, metric):18.3f}" if metric == "nll_raw"
                      else f"{100 * _mean(members, split, metric):18.1f}" for split, metric in COLUMNS]
            key = CHOICES.get(members[0].head)
            choice = f"{key} {[cell.params.get(key) for cell in members]}" if key else ""
            if label == chosen:
                choice = f"weight balancing chosen on val from {len(balanced)} settings"
            gain = 100 * (_mean(members, "test", "top1") - base)
            print(f"{imbalance:>4} {label:<62} {' '.join(values)} {gain:+6.1f}  {choice}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
