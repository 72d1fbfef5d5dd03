"""Accuracy vs KV-cache group count: MadaKV (MPA + balanced HCC) and PyramidKV with their layer
budgets made equal inside 1, 3 or 30 buckets of layers, as vLLM keeps them with
`--kv-eviction-layer-groups` 1 (the default), 3 (`auto` for 30 layers) or 30 (one per layer).

    python benchmarks/run_layer_buckets.py [--samples 100] [--budgets 0.05 0.1] [--buckets 1 3 30]

On the HF reference path (one prefill per sample, every setting decodes from its own evicted copy,
`generate_sweep`): vLLM with N groups keeps exactly the counts of `layer_buckets=N` here (tested
token for token at N = L in tests/test_layer_groups.py). SmolLM2-LLaVA (30 layers, fp32) on the
synthetic suite (seed 0, default lengths). Writes benchmarks/results/layer_buckets.json with each
score's n and 95 % interval.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=100, help="per task")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.1])
    p.add_argument("--buckets", type=int, nargs="+", default=[1, 3, 30])
    p.add_argument("--max-tokens", type=int, default=12)
    args = p.parse_args()
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    from _stamp import hf_judge, hf_sweep, stamp, synthetic_suite, write_results
    from madakv_vllm.evaluation.milebench import list_tasks, load_task
    from madakv_vllm.evaluation.report import interval
    from madakv_vllm.policies import make_policy

    model, processor = hf_judge()
    data = synthetic_suite(args.samples)
    policies = {("none", None, None): None}
    for name in ("madakv", "pyramidkv"):
        for budget in args.budgets:
            for buckets in args.buckets:
                policies[(name, budget, buckets)] = make_policy(name, budget=budget, layer_buckets=buckets)
    scores: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    samples = [s for task in list_tasks(data) for s in load_task(data, task)]
    started = time.time()
    for sample, _, key, _, score, _ in hf_sweep(model, processor, samples, policies, args.max_tokens,
                                                "layer buckets (HF)"):
        scores[key][sample.task].append(score)
    rows = []
    for (name, budget, buckets), per_task in scores.items():
        for task, values in sorted(per_task.items()):
            low, high = interval(values)
            rows.append(dict(policy=name, budget=budget, layer_buckets=buckets, task=task, n=len(values),
                             score=sum(values) / len(values), ci_low=low, ci_high=high))
    for row in rows:
        print(f"{row['policy']:9s} {row['budget'] or '':>5} buckets {row['layer_buckets'] or '-':>3} {row['task']:24s} "
              f"{row['score']:.2f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}] n={row['n']}")
    write_results(HERE / "results" / "layer_buckets", dict(
        stamp=stamp(), model="SmolLM2-LLaVA fp32 (HF reference path), 30 layers", samples_per_task=args.samples,
        max_new_tokens=args.max_tokens, seconds=round(time.time() - started), rows=rows))


if __name__ == "__main__":
    main()
