"""How far generation drifts when the output is evicted during decode, on the judge (HF reference
path, SmolLM2-LLaVA, fp32). The judge answers in a few words and cannot reason, so the probe is
the drift of a long greedy continuation:

    python benchmarks/run_decode_fidelity.py [--per-task 5] [--tokens 256] [--caps 64 128 256 512]

Each prompt of the suite (dev split; the tasks take turns) is decoded greedily for `--tokens`
tokens with the end token masked, with the full cache and with MadaKV under every cap (the prompt
itself is not evicted, budget 1.0, so only the caps differ: the first compaction, `window` tokens
into the output, already cuts the prompt to the cap). Per setting: the share of those tokens equal
to the full cache's at the same place, and where the first difference is (the answer comes first:
a difference inside the first ~8 tokens changes the answer).
Not measured: a fact restated after a long output. Asked again after a filler turn, the judge fails
even with the full cache (it copies the filler or answers from its weights), so such a probe says
nothing about eviction here; it needs a model that can hold a conversation.
Caps are tokens per head and layer; decode slack 0.25 of the cap, window 8 (MadaKV's defaults).
Intervals: 95 % bootstrap over prompts, n = prompts. Writes benchmarks/results/decode_fidelity.json
(+ .png); `--summarize` rebuilds them from samples files (shards run with --tasks / --start).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--per-task", type=int, default=5, help="prompts per task")
    p.add_argument("--start", type=int, default=0, help="from each task's START-th sample on (shards)")
    p.add_argument("--tasks", nargs="+")
    p.add_argument("--tokens", type=int, default=256, help="decoded tokens compared with the full cache's")
    p.add_argument("--caps", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--out", default=str(HERE / "results" / "decode_fidelity"))
    p.add_argument("--summarize", nargs="+", metavar="SAMPLES.jsonl", help="only summarize these samples files")
    args = p.parse_args()
    sys.path.insert(0, str(HERE))
    if args.summarize:
        rows = [json.loads(line) for path in args.summarize for line in Path(path).read_text().splitlines()]
    else:
        rows = run(args)
    write(args, rows)


def run(args) -> list[dict]:
    import torch
    from tqdm import tqdm

    from _stamp import hf_inputs, hf_judge, suite_samples, synthetic_suite
    from madakv_vllm.hf import generate_with_eviction
    from madakv_vllm.policies import make_policy

    model, processor = hf_judge()
    tasks = len(args.tasks) if args.tasks else 5
    samples = suite_samples(synthetic_suite(100), args.tasks, args.start)[:tasks * args.per_task]
    settings = {"full cache": None, **{f"cap {cap}": make_policy("madakv", budget=1.0, decode_budget=cap)
                                       for cap in args.caps}}
    rows = []
    with open(f"{args.out}-samples.jsonl", "a") as jsonl:
        for sample in tqdm(samples, desc="prompts", unit="prompt"):
            inputs = hf_inputs(processor, sample)
            n = inputs["input_ids"].shape[1]
            full = None
            for name, policy in settings.items():
                started = time.perf_counter()
                with torch.inference_mode():
                    out, report = generate_with_eviction(model, inputs, policy, max_new_tokens=args.tokens,
                                                         min_new_tokens=args.tokens, do_sample=False)
                tokens = out[0, n:].tolist()
                full = tokens if full is None else full
                same = [a == b for a, b in zip(tokens, full)]
                rows.append(dict(task=sample.task, sample_id=sample.sample_id, setting=name, prompt_tokens=n,
                                 agreement=sum(same) / len(same),
                                 first_difference=same.index(False) if False in same else len(same),
                                 decode_compactions=len(report.decode_compactions),
                                 seconds=round(time.perf_counter() - started, 2)))
                jsonl.write(json.dumps(rows[-1]) + "\n")
                jsonl.flush()
    return rows


def write(args, rows: list[dict]) -> None:
    from _stamp import stamp, write_results
    from madakv_vllm.evaluation.report import interval

    summary = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        rs = [r for r in rows if r["setting"] == setting]
        agreement = [r["agreement"] for r in rs]
        summary.append(dict(
            setting=setting, n=len(rs), agreement=round(statistics.mean(agreement), 3),
            agreement_ci=[1.0, 1.0] if setting == "full cache" else [round(x, 3) for x in interval(agreement)],
            first_difference_median=statistics.median(r["first_difference"] for r in rs),
            decode_compactions=round(statistics.mean(r["decode_compactions"] for r in rs), 1),
            seconds_per_prompt=round(statistics.mean(r["seconds"] for r in rs), 1)))
        s = summary[-1]
        print(f"{setting:>12s}: agreement {s['agreement']:.2f} {s['agreement_ci']}, first difference at "
              f"{s['first_difference_median']} (median), {s['decode_compactions']} compactions (n={s['n']})")
    write_results(args.out, dict(
        stamp=stamp(), model="SmolLM2-LLaVA judge, HF reference path, fp32", tokens=args.tokens, split="dev (seed 0)",
        policy="madakv, budget 1.0 (prompt kept), decode slack 0.25", summary=summary), draw)


def draw(plt, result: dict):
    """Agreement with the full cache per cap, with 95 % intervals."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    rows = result["summary"]
    values = [r["agreement"] for r in rows]
    errors = [[v - r["agreement_ci"][0] for v, r in zip(values, rows)],
              [r["agreement_ci"][1] - v for v, r in zip(values, rows)]]
    ax.bar([r["setting"] for r in rows], values, yerr=errors, capsize=3, color=[f"C{i}" for i in range(len(rows))])
    ax.set(ylim=(0, 1.05), ylabel=f"share of the first {result['tokens']} tokens equal to the full cache's",
           title=f"Eviction during decode on the judge ({result['split']}, n = {rows[0]['n']} prompts)")
    ax.title.set_fontsize(9)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
