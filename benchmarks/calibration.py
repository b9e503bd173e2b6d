"""Calibration of the logit-shifting losses: ECE and NLL before and after temperature scaling.

On a feature file (default: the CIFAR-10-LT IF = 100 features that
``bash benchmarks/cifar10_lt/run.sh 40`` writes), fits the linear head with
cross-entropy, balanced softmax and logit adjustment (instance sampling,
seed 0, the default budget), each with a temperature fitted on val (Guo et
al., ICML 2017), and prints per split the top-1, expected calibration error
(15 bins) and NLL before (raw) and after scaling. The question it answers:
do the methods that shift logits by the class prior still give calibrated
probabilities on the balanced test set?

    .venv/bin/python benchmarks/calibration.py
    .venv/bin/python benchmarks/calibration.py --features features/other.h5 --losses ce,focal
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from decouple.features import read_features
from decouple.stage_two.cells import Cell
from decouple.stage_two.config import TrainConfig
from decouple.stage_two.fit import fit_cells

DEFAULT_FEATURES = Path(__file__).resolve().parent / "cifar10_lt" / "work" / "features" / "cifar10_lt_if100_e40.h5"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", default=str(DEFAULT_FEATURES))
    parser.add_argument("--losses", default="ce,balanced_softmax,logit_adjusted")
    parser.add_argument("--head", default="linear")
    args = parser.parse_args()
    if not Path(args.features).is_file():
        print(f"{args.features}: not found; make it with `bash benchmarks/cifar10_lt/run.sh 40`", file=sys.stderr)
        return 2
    feature_set = read_features(args.features)
    cells = [Cell(args.head, loss, "instance", 0) for loss in args.losses.split(",")]
    start = time.perf_counter()
    results = fit_cells(feature_set, cells, train=TrainConfig())
    print(f"{args.features}: {len(cells)} cells of head {args.head} in {time.perf_counter() - start:.1f} s")
    print(f"{'loss':<18} {'T (val)':>8} {'split':<8} {'n':>6} {'top1':>6} {'ECE raw':>8} {'ECE':>6} "
          f"{'NLL raw':>8} {'NLL':>6}")
    for result in results:
        temperature = result.params["calibration"]["temperature"]
        for split, values in result.metrics.items():
            print(f"{result.loss:<18} {temperature:>8.3f} {split:<8} {values['n']:>6} {100 * values['top1']:>6.1f} "
                  f"{100 * values['ece_raw']:>7.1f}% {100 * values['ece']:>5.1f}% {values['nll_raw']:>8.3f} "
                  f"{values['nll']:>6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
