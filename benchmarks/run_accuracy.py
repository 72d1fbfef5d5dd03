"""Accuracy vs KV budget on the synthetic MileBench-layout suite with the SmolLM2-LLaVA test
model, served by `vllm serve --kv-eviction` and scored by `madakv-eval`, in one command:

    python benchmarks/run_accuracy.py [--samples 8] [--policies none madakv snapkv ...] [--budgets 0.05 0.1 0.2 0.5]

Builds the model (benchmarks/.models/) and the data (seed 0) when missing, starts the server
(prefix caching on, so settings after the first reuse most of each prompt's prefill), runs the
sweep, prints a markdown table and writes benchmarks/results/accuracy/ (samples.jsonl,
summary.csv, scores.png with matplotlib, table.md). The table's "KV kept" column is what the
server's own counters measured for each setting (share of the prompt's KV left after eviction).
PyramidKV is left out by default: vLLM keeps one block table for all layers, so it runs with
uniform layers there, which makes it SnapKV (the HF ablation has the real PyramidKV).
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=8, help="per task; lengths cycle 1K, 2K, 4K, 8K tokens")
    # H2O and LOOK-M score with every prompt query (quadratic): minutes per 8K prompt on 2 CPU cores
    p.add_argument("--policies", nargs="+", default=["none", "madakv", "snapkv", "streamingllm"])
    p.add_argument("--budgets", nargs="+", default=["0.05", "0.1", "0.2", "0.5"])
    p.add_argument("--out", default=str(HERE / "results" / "accuracy"))
    p.add_argument("--dtype", default="bfloat16", help="float32 on CPUs with AMX (eviction refuses their bf16 layout)")
    args = p.parse_args()
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    from _stamp import smollm2_llava, synthetic_suite

    from madakv_vllm.demo import free_port, wait_ready

    model, data = smollm2_llava(), synthetic_suite(args.samples)
    port = free_port()
    vllm = Path(sys.executable).with_name("vllm")
    log = Path(args.out) / "server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # dev mode serves POST /reset_prefix_cache: madakv-eval empties the cache between settings
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "VLLM_SERVER_DEV_MODE": "1"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    server = subprocess.Popen([str(vllm), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
                               "--served-model-name", "smollm2-llava", "--dtype", args.dtype, "--max-model-len",
                               "8192", "--limit-mm-per-prompt", '{"image": 16}', "--kv-eviction", "madakv"],
                              stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(f"http://127.0.0.1:{port}", server, log)
        subprocess.run([str(Path(sys.executable).with_name("madakv-eval")), "--data", str(data), "--endpoint",
                        f"http://127.0.0.1:{port}/v1", "--policies", *args.policies, "--budgets", *args.budgets,
                        "--concurrency", "2", "--max-tokens", "16", "--out", args.out], check=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    table = markdown_table(Path(args.out) / "summary.csv")
    (Path(args.out) / "table.md").write_text(table)
    print(table)


def markdown_table(summary_csv: Path) -> str:
    with open(summary_csv) as f:
        rows = list(csv.DictReader(f))
    tasks = sorted({r["task"] for r in rows} - {"ALL"}) + ["ALL"]
    scores, kept, order = defaultdict(dict), {}, {}
    for r in rows:
        setting = "full cache" if r["policy"] == "none" else f"{r['policy']} {float(r['budget']):.0%}"
        scores[setting][r["task"]] = float(r["score"])
        order[setting] = (r["policy"] != "none", r["policy"], float(r["budget"] or 1))
        if r["task"] == "ALL" and r.get("kv_kept"):
            kept[setting] = f"{float(r['kv_kept']):.1%}"
    lines = ["| setting | " + " | ".join("mean" if t == "ALL" else t for t in tasks) + " | KV kept |",
             "|---" * (len(tasks) + 2) + "|"]
    for setting in sorted(scores, key=order.get):
        lines.append(f"| {setting} | " + " | ".join(f"{scores[setting].get(t, 0):.2f}" for t in tasks)
                     + f" | {kept.get(setting, '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
