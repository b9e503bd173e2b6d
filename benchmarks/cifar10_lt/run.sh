#!/usr/bin/env bash
# CIFAR-10-LT with a CIFAR ResNet-32 from scratch, then the full stage-two
# grid, then tables and plots. Usage, from the repository root:
#
#   bash benchmarks/cifar10_lt/run.sh [EPOCHS]      # default 200, the standard protocol
#   IMBALANCE=50 bash benchmarks/cifar10_lt/run.sh 40   # another imbalance factor (default 100)
#
# Stage one follows Cao et al. 2019's CIFAR protocol: SGD, momentum 0.9,
# lr 0.1, weight decay 2e-4, batch 128, 5 warm-up epochs, lr x0.1 at 80% and
# 90% of the epochs (160 and 180 of 200). Fewer EPOCHS compress the same
# schedule. Stage one is resumable: rerun the same command after a crash.
set -euo pipefail
EPOCHS=${EPOCHS:-${1:-200}}
IMBALANCE=${IMBALANCE:-100}
HERE=benchmarks/cifar10_lt
WORK=$HERE/work
DECOUPLE=${DECOUPLE:-.venv/bin/decouple}
mkdir -p "$WORK/features" "$HERE/results"
if [ ! -d "$WORK/cifar10/train" ]; then
  tar -xJf ../shared/data/cifar10-jpg.tar.xz -C "$WORK"
fi
RUN=cifar10_lt_if${IMBALANCE}_e$EPOCHS
if [ ! -f "$WORK/features/$RUN.h5" ]; then
  RESUME=""
  [ -f "$WORK/features/$RUN.ckpt.pt" ] && RESUME="--resume"
  "$DECOUPLE" extract --data "$WORK/cifar10" --backbone resnet32_cifar --imbalance "$IMBALANCE" \
    --epochs "$EPOCHS" --schedule step --lr-steps "$((EPOCHS * 8 / 10)),$((EPOCHS * 9 / 10))" \
    --lr 0.1 --momentum 0.9 --weight-decay 2e-4 --batch-size 128 --warmup-epochs 5 \
    --seed 0 --name "$RUN" --features-dir "$WORK/features" $RESUME
fi
sed "s#FEATURES#$WORK/features/$RUN.h5#; s#RESULTS_DB#$HERE/results/$RUN.db#" "$HERE/grid.yaml" > "$WORK/$RUN.yaml"
"$DECOUPLE" sweep "$WORK/$RUN.yaml"
DB=$HERE/results/$RUN.db
OUT=$HERE/results/$RUN
METRICS=top1,macro_f1,many,medium,few,many_f1,medium_f1,few_f1
"$DECOUPLE" export --db "$DB" --format markdown --splits test,test_lt --metrics "$METRICS" -o "$OUT.md"
"$DECOUPLE" export --db "$DB" --format csv -o "$OUT.cells.csv"
# The losses on a linear head with instance sampling, and every head with plain cross-entropy.
"$DECOUPLE" export --db "$DB" --format markdown --splits test,test_lt --metrics "$METRICS" \
  --head linear --sampler instance -o "$OUT.losses.md" --plots "${OUT}_plots/losses"
"$DECOUPLE" export --db "$DB" --format markdown --splits test,test_lt --metrics "$METRICS" \
  --loss ce --loss none --sampler instance --sampler none -o "$OUT.heads.md" --plots "${OUT}_plots/heads"
"$DECOUPLE" export --db "$DB" --format markdown --splits test,test_lt --metrics "$METRICS" \
  --head linear --loss ce -o "$OUT.samplers.md"
echo "tables: $OUT.md (all), $OUT.losses.md, $OUT.heads.md, $OUT.samplers.md, $OUT.cells.csv; plots: ${OUT}_plots/"
