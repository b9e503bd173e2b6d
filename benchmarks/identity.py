"""Behaviour identity of a refactor: the same grid, before and after, cell by cell.

Runs every head x loss x sampler of the registries, two seeds, precision
float32, on one or more feature files through the public CLI (``decouple
sweep`` then ``decouple export --format json --cells``) and writes every
cell's metrics to a JSON file; ``compare`` then checks that two such files
hold equal metrics for every cell and split. Run the older code by putting
its checkout first on PYTHONPATH::

    python benchmarks/identity.py synthetic /tmp/ident/synthetic.h5
    PYTHONPATH=/tmp/before python benchmarks/identity.py run --features demo_out/features/digits_lt.h5 \\
        --features /tmp/ident/synthetic.h5 --out /tmp/ident/before.json
    python benchmarks/identity.py run --features demo_out/features/digits_lt.h5 \\
        --features /tmp/ident/synthetic.h5 --out /tmp/ident/after.json
    python benchmarks/identity.py compare /tmp/ident/before.json /tmp/ident/after.json

Exit 0 when every cell's metrics are equal, 1 otherwise (the differing cells
are printed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

import yaml

#: Fields of a cell record that identify it; the rest is what the cell computed.
KEY = ("features", "head", "loss", "sampler", "seed", "split")
#: Fields of an export row that say when and how fast, not what was computed.
NOT_RESULTS = {"fit_seconds", "wall_seconds", "finished_at", "versions"}


def _cli(*args: str, cwd: Path) -> str:
    """Run ``decouple ARGS`` with this interpreter and PYTHONPATH; returns stdout."""
    command = [sys.executable, "-m", "cli.main", *args]
    done = subprocess.run(command, cwd=cwd, env=dict(os.environ), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def _names(kind: str, cwd: Path) -> List[str]:
    return [line.split()[0] for line in _cli("list", kind, cwd=cwd).splitlines() if line.strip()]


def run(features: List[str], out: Path, seeds: List[int]) -> None:
    """Sweep the whole registry grid on ``features`` and write the cells' metrics to ``out``."""
    import cli.main  # noqa: F401  (which checkout runs is printed below)
    import decouple

    work = Path(tempfile.mkdtemp(prefix="identity-"))
    print(f"code: {Path(decouple.__file__).parent}", flush=True)
    config = {
        "features": [str(Path(path).resolve()) for path in features],
        "grid": {
            "head": _names("heads", work),
            "loss": _names("losses", work),
            "sampler": _names("samplers", work),
            "seed": seeds,
        },
        "train": {"precision": "float32"},
        "db": str(work / "results.db"),
    }
    (work / "grid.yaml").write_text(yaml.safe_dump(config))
    _cli("sweep", str(work / "grid.yaml"), cwd=work)
    rows = json.loads(_cli("export", "--db", str(work / "results.db"), "--format", "json", "--cells",
                           "--fraction", cwd=work))
    cells = {}
    for row in rows:
        key = "|".join(str(row.get(field)) for field in KEY)
        cells[key] = {name: value for name, value in row.items() if name not in KEY and name not in NOT_RESULTS}
    out.write_text(json.dumps(cells, indent=1, sort_keys=True))
    print(f"{len(cells)} cells from {len(config['grid']['head'])} heads x "
          f"{len(config['grid']['loss'])} losses x {len(config['grid']['sampler'])} samplers x "
          f"{len(seeds)} seeds on {len(features)} feature files -> {out}")


def compare(before: Path, after: Path) -> int:
    """Print how many cells agree; 0 when all do, else 1."""
    old, new = (
        {key: {name: value for name, value in row.items() if name not in NOT_RESULTS}
         for key, row in json.loads(path.read_text()).items()}
        for path in (before, after)
    )
    differing: List[Tuple[str, Dict, Dict]] = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            differing.append((key, old.get(key), new.get(key)))
    print(f"{len(old)} cells before, {len(new)} after; {len(old) - len(differing)} equal, {len(differing)} differ")
    for key, a, b in differing[:20]:
        if a is None or b is None:
            print(f"  {key}: only {'after' if a is None else 'before'}")
            continue
        fields = sorted(name for name in set(a) | set(b) if a.get(name) != b.get(name))
        print(f"  {key}: " + ", ".join(f"{name} {a.get(name)} -> {b.get(name)}" for name in fields))
    return 0 if not differing else 1


def synthetic(out: Path) -> None:
    """A synthetic long-tailed feature file (20 classes, IF 100, 64 dims)."""
    from decouple.features import write_features
    from decouple.synthetic import gaussian_long_tailed

    feature_set, _ = gaussian_long_tailed(num_classes=20, dim=64, n_max=400, imbalance_factor=100.0, seed=7)
    write_features(out, feature_set)
    print(f"wrote {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="sweep the registry grid and write the cells' metrics")
    run_parser.add_argument("--features", action="append", required=True, metavar="FILE")
    run_parser.add_argument("--out", required=True, type=Path)
    run_parser.add_argument("--seeds", default="0,1", help="comma-separated seeds [0,1]")
    compare_parser = commands.add_parser("compare", help="check two runs' metrics are equal")
    compare_parser.add_argument("before", type=Path)
    compare_parser.add_argument("after", type=Path)
    synthetic_parser = commands.add_parser("synthetic", help="write the synthetic long-tailed feature file")
    synthetic_parser.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.command == "run":
        run(args.features, args.out, [int(seed) for seed in args.seeds.split(",")])
        return 0
    if args.command == "synthetic":
        synthetic(args.out)
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
