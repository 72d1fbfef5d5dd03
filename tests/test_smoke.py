"""The serving smoke test that scripts/gpu_check.sh runs on CUDA, here on CPU (short)."""
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # starts a server


def test_smoke_serves_evicts_and_ends_with_an_empty_cache():
    from test_vllm_server import server_env

    result = subprocess.run([sys.executable, "-m", "madakv_vllm.smoke", "--seconds", "15", "--concurrency", "4"],
                            env=server_env(), capture_output=True, text=True, timeout=900)
    verdict = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0 and verdict.startswith("smoke: PASS"), result.stdout[-2000:] + result.stderr[-2000:]
