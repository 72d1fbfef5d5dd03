#!/usr/bin/env bash
# Device check, for a machine with an NVIDIA GPU, torch and triton (no vLLM, no network needed):
#   1. the kernel tests natively on CUDA (Triton vs the torch reference and a float64 oracle;
#      fp32/fp16/bf16, NHD/HND and transposed layouts, GQA up to 7:1, split key slices);
#   2. benchmarks/bench_kernels.py at 8K/32K/128K tokens: GB/s and % of the card's peak HBM.
# Usage: bash scripts/device_check.sh [OUTPUT_DIR]   (default benchmarks/results; about 2 minutes on an H100)
# Prints one verdict line last. Users with vLLM on a CUDA box run scripts/gpu_check.sh instead.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-benchmarks/results}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
if ! "$PY" -c "import torch, triton, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "device_check: FAIL: no CUDA device visible to torch (or torch/triton missing)"; exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"

"$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tee "$OUT_DIR/device_tests.log"
tests_rc=${PIPESTATUS[0]}
"$PY" benchmarks/bench_kernels.py --out "$OUT_DIR/kernels" 2>&1 | tee "$OUT_DIR/device_bench.log"
bench_rc=${PIPESTATUS[0]}

if [ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]; then
  echo "device_check: PASS (kernel tests on CUDA; numbers in $OUT_DIR/kernels.json)"
else
  echo "device_check: FAIL (kernel tests rc=$tests_rc, benchmark rc=$bench_rc)"; exit 1
fi
