#!/usr/bin/env bash
# The GPU path, one line per check (issue 13, item 4): fine-tuning with bf16,
# channels_last and the decoded images in GPU memory; extraction; ncm with
# 5,000 classes; knn on the FAISS GPU index; torchrun with NCCL; the
# stage-two grid in bf16 against float32. benchmarks/gpu_check.py holds the
# checks and says what each prints. From the repository root:
#
#   bash benchmarks/gpu_check.sh            # on one GPU: 30 epochs, under 8 minutes on an H100-class card
#   bash benchmarks/gpu_check.sh --smoke    # any machine, small: tests the script (make test runs it on the CPU)
#
# DATA (default .gpu_data/cifar10_lt.tar.xz) is the CIFAR-10-LT subset; it is
# written from ../shared/data/cifar10-jpg.tar.xz when missing, so prepare it
# on a machine that has that tarball before sending the tree to one that
# has not. PYTHON defaults to .venv/bin/python, else python3. Exit status 1
# when a check failed; every check runs either way.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DATA=${DATA:-.gpu_data/cifar10_lt.tar.xz}
if [ ! -f "$DATA" ]; then
  "$PYTHON" benchmarks/gpu_check.py --prepare "$DATA"
fi
PYTHONPATH=. PYTHONUNBUFFERED=1 exec "$PYTHON" benchmarks/gpu_check.py --data "$DATA" "$@"
