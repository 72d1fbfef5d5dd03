"""The kernel microbenchmark runs and writes its stamped results (CPU: torch path only)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_kernel_benchmark_writes_stamped_results(tmp_path):
    out = tmp_path / "kernels"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--lengths", "512",
                    "--out", str(out)], check=True, capture_output=True, timeout=300)
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["stamp"]["machine"] and result["stamp"]["torch"]
    (row,) = result["rows"]
    assert row["n"] == 512 and row["impl"] == "torch"
    assert row["score_gbps"] > 0 and row["compact_gbps"] > 0
