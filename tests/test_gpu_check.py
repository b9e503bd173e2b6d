"""benchmarks/gpu_check.sh (issue 13, item 4): it parses, and its small run
(--smoke) prints one line per check and passes on the CPU; the GPU figures
come from running it on a GPU machine."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def test_the_gpu_check_script_parses_and_its_smoke_run_passes(cifar_subset, tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    data = tmp_path / "cifar10_lt.tar.xz"
    with tarfile.open(data, "w:xz") as archive:
        archive.add(cifar_subset, arcname="cifar10")
    done = subprocess.run(["bash", str(SCRIPT), "--smoke"], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "DATA": str(data), "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("device: ")
    for check in ("finetune:", "ncm:", "knn:", "torchrun:", "stage two:"):
        assert sum(line.startswith(check) for line in lines) == 1, (check, done.stdout)
    assert "FAILED" not in done.stdout
