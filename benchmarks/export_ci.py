"""Bootstrap confidence intervals on a whole results database: how long they take.

On the committed CIFAR-10-LT database (130 methods x 3 seeds = 390 cells,
scored on val 200, test 10,000 and test_lt 2,478 images), times in one
process:

* reading the cells (the bare baseline) and reading them with their
  per-image predictions;
* ``decouple export --ci``'s work: the summary table of every method on
  test and test_lt with 95% intervals from 1,000 stratified resamples, and
  the same table without intervals (the ratio is the cost of --ci);
* ``decouple recommend``'s work;

then both commands end to end as a user runs them (a fresh process each,
imports included). The target (issue 11): intervals for the whole database
in under 10 s on 2 cores.

    .venv/bin/python benchmarks/export_ci.py
    .venv/bin/python benchmarks/export_ci.py --db other.db --resamples 2000
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from decouple.study.export import render
from decouple.study.recommend import recommend
from decouple.study.store import load_records

DEFAULT_DB = Path(__file__).resolve().parent / "cifar10_lt" / "results" / "cifar10_lt_if100_e40.db"
TABLE = dict(format="markdown", splits=["test", "test_lt"],
             metrics=["top1", "macro_f1", "mean_class_acc", "many", "medium", "few"])


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default=str(DEFAULT_DB))
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()
    if not Path(args.db).is_file():
        print(f"{args.db}: not found; make it with `bash benchmarks/cifar10_lt/run.sh 40`", file=sys.stderr)
        return 2
    records, bare_read = timed(load_records, args.db)
    with_predictions, read = timed(load_records, args.db, predictions=True)
    _, plain = timed(render, records, **TABLE)
    _, with_ci = timed(render, with_predictions, ci=True, resamples=args.resamples, **TABLE)
    found, ranked = timed(recommend, args.db, resamples=args.resamples)
    sizes = {split: values["n"] for split, values in records[0].metrics.items()}
    print(f"{args.db}: {len(records)} cells, {len({tuple(r.method.values()) for r in records})} methods; "
          f"splits {sizes}; {args.resamples} resamples")
    print(f"  read cells                     {bare_read:6.2f} s  (baseline)")
    print(f"  read cells + predictions       {read:6.2f} s  ({read / bare_read:.1f}x)")
    print(f"  summary table, no intervals    {plain:6.2f} s")
    print(f"  summary table with --ci        {with_ci:6.2f} s  ({with_ci / plain:.0f}x the table without)")
    print(f"  recommend                      {ranked:6.2f} s  (best on val: {found.best.method.text()}, "
          f"{len(found.indistinguishable) - 1} others not separable from it)")
    decouple = str(Path(sys.executable).with_name("decouple"))
    for command in (["export", "--db", args.db, "--ci", "--splits", "test,test_lt", "--resamples", str(args.resamples)],
                    ["recommend", "--db", args.db, "--resamples", str(args.resamples)]):
        start = time.perf_counter()
        subprocess.run([decouple, *command], check=True, stdout=subprocess.DEVNULL)
        print(f"  `decouple {command[0]} ...{' --ci' if command[0] == 'export' else ''}` end to end, "
              f"fresh process: {time.perf_counter() - start:5.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
