#!/usr/bin/env bash
# The trainer's device checks in one call (issue 5's GPU aim), for a lent GPU machine whose python3
# holds PyTorch but not zarr & co.: those travel as wheels in .whl/ and Fashion-MNIST's test split in
# .gpudata/fashion-mnist (both git-ignored; benchmarks/README.md, section GPU, says how to make them). Writes logs to $OUT.
#
#   bash benchmarks/gpu.sh            # on the device machine, from the repository root
#   E2E=0 bash benchmarks/gpu.sh      # the step benchmarks only
#
# 1. benchmarks/train.py: nine 24,576-wide SAEs on d=768, bf16, batch 4096: plain GEMMs, eager and
#    compiled stages (after checking compiled == eager on the device), patches/s, 100M-patch time,
#    and the fastest step's kernels by device time.
# 2. End to end on the device: record 5,000 Fashion-MNIST images, train the default nine SAEs
#    (compiled stages, bf16), evaluate, export.
# 3. The step at batch 8192 (the fixed per-step cost, Adam over 340M parameters, halves per patch).
set -u -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

echo "== 1. training step, nine SAEs of width 24576 on d=768, bf16, batch 4096"
timeout 300 python3 benchmarks/train.py --device cuda --d 768 --width 24576 --n 9 --precision bf16 --no-store \
    --profile 2>&1 | tee "$OUT/train_b4096.txt" | grep -v "^W1"

if [ "${E2E:-1}" = 1 ]; then
echo "== 2. end to end: record, saev-train (default nine SAEs, compiled, bf16), evaluation, export"
timeout 60 python3 -m saev_store.cli record --out /tmp/e2e.zarr --data .gpudata/fashion-mnist --split test \
    --limit 5000 --image-size 112 --layer 10 --device cuda --batch-size 256 --num-workers 4 --quiet \
    2>&1 | tee "$OUT/e2e.txt"
timeout 180 python3 -m trainers.cli /tmp/e2e.zarr --hook _blocks.10 --out /tmp/e2e-run --device cuda \
    --precision bf16 --batch-size 4096 --n-patches 2000000 --n-epochs 20 --log-every 100 --quiet \
    2>&1 | tee -a "$OUT/e2e.txt" | grep -v "^W1"
cp /tmp/e2e-run/table.md "$OUT/e2e_table.md" 2>/dev/null
fi

echo "== 3. the same step at batch 8192"
timeout 150 python3 benchmarks/train.py --device cuda --d 768 --width 24576 --n 9 --precision bf16 --no-store \
    --batch-size 8192 --iters 10 2>&1 | tee "$OUT/train_b8192.txt" | grep -v "^W1"
