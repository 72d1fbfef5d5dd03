#!/usr/bin/env bash
# For a CUDA machine with vLLM: the whole test suite on the GPU, then a 2-minute serving smoke
# test with vLLM's defaults (cudagraphs, async scheduling), and one verdict line.
#   pip install '.[cuda,test]'       # vllm==0.32.0 (CUDA build) + this package + test tools
#   bash scripts/gpu_check.sh
# On CUDA the tests pick the GPU by themselves: the Triton kernels run natively (no interpreter),
# vLLM's attention ops run on CUDA tensors, and the engine tests run vLLM's CUDA runner.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, vllm, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: FAIL: needs a CUDA GPU and vllm==0.32.0 in this Python (pip install '.[cuda,test]')"; exit 2
fi
export VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
"$PY" -c "import torch, vllm; print('gpu_check:', torch.cuda.get_device_name(), '| torch', torch.__version__, '| vllm', vllm.__version__)"
"$PY" -m pytest -q tests
tests_rc=$?
"$PY" -m madakv_vllm.smoke --seconds 120
smoke_rc=$?
if [ "$tests_rc" = 0 ] && [ "$smoke_rc" = 0 ]; then
  echo "gpu_check: PASS (test suite and serving smoke test on CUDA)"
else
  echo "gpu_check: FAIL (tests rc=$tests_rc, smoke rc=$smoke_rc)"; exit 1
fi
