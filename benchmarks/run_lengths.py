"""Where the judge still reads: full-cache score of SmolLM2-LLaVA on each synthetic task at
each prompt length (HF reference path, no eviction), so users see where the judge stops working
and the suite's default lengths stay inside that range:

    python benchmarks/run_lengths.py [--lengths 1k 2k 4k 8k] [--samples 100 40 20 10]

`--samples` gives the samples per task for each length (long prompts cost minutes each on 2
CPU cores). Results for lengths run earlier are kept, so lengths can run one at a time. Writes
benchmarks/results/lengths.json (rows of {task, length, tokens, score, n, ci_low, ci_high}: mean
prompt tokens, Wilson 95 % interval) and lengths.png.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "lengths"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", nargs="+", default=["1k", "2k", "4k", "8k"])
    p.add_argument("--samples", nargs="+", type=int, default=[100, 40, 20, 10], help="per task, one per length")
    p.add_argument("--max-new-tokens", type=int, default=12)
    args = p.parse_args()
    if len(args.samples) == 1:
        args.samples *= len(args.lengths)
    if len(args.samples) != len(args.lengths):
        p.error("give one --samples value, or one per length")
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    import torch
    from tqdm import tqdm

    from _stamp import hf_inputs, hf_judge, stamp, synthetic_suite, write_results
    from madakv_vllm.evaluation.milebench import list_tasks, load_task, scorer_for
    from madakv_vllm.evaluation.report import interval

    model, processor = hf_judge()
    old = json.loads(OUT.with_suffix(".json").read_text()) if OUT.with_suffix(".json").is_file() else {}
    rows = [r for r in old.get("rows", []) if r["length"] not in args.lengths]
    seconds = dict(old.get("seconds", {}))
    for length, samples in zip(args.lengths, args.samples):
        data, started = synthetic_suite(samples, [length]), time.time()
        for task in list_tasks(data):
            scores, tokens = [], []
            for sample in tqdm(load_task(data, task), desc=f"{task} {length}", unit="sample"):
                inputs = hf_inputs(processor, sample)
                n = inputs["input_ids"].shape[1]
                with torch.inference_mode():
                    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
                reply = processor.decode(out[0, n:], skip_special_tokens=True)
                scores.append(scorer_for(sample)(reply, sample.answer, sample.choices))
                tokens.append(n)
            low, high = interval(scores)
            rows.append(dict(task=task, length=length, tokens=round(sum(tokens) / len(tokens)),
                             score=sum(scores) / len(scores), n=len(scores), ci_low=round(low, 4),
                             ci_high=round(high, 4)))
            print(f"{task} {length}: {rows[-1]['score']:.2f} [{low:.2f}, {high:.2f}] n={len(scores)}, "
                  f"{rows[-1]['tokens']} tokens")
        seconds[length] = round(time.time() - started)
    order = {name: i for i, name in enumerate(["1k", "2k", "4k", "8k"])}
    rows.sort(key=lambda r: (r["task"], order.get(r["length"], 9)))

    write_results(OUT, dict(stamp=stamp(), model="SmolLM2-LLaVA fp32 (HF reference path, full cache)",
                            max_new_tokens=args.max_new_tokens, seconds=seconds, rows=rows), draw)


def draw(plt, result: dict):
    """lengths.png from lengths.json: full-cache score (95 % interval, n) per task vs prompt length."""
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, task in enumerate(sorted({r["task"] for r in rows})):
        mine = sorted((r for r in rows if r["task"] == task), key=lambda r: r["tokens"])
        ax.errorbar([r["tokens"] for r in mine], [r["score"] for r in mine], marker="o", capsize=3, label=task,
                    color=f"C{i}", yerr=[[r["score"] - r["ci_low"] for r in mine],
                                         [r["ci_high"] - r["score"] for r in mine]])
        for r in mine:
            ax.annotate(f"{r['score']:.2f} (n={r['n']})", (r["tokens"], r["score"]), textcoords="offset points",
                        xytext=(-7, -11) if i % 2 else (7, 4), ha="right" if i % 2 else "left", fontsize=7,
                        color=f"C{i}")
    ax.axhline(0.8, color="gray", linestyle=":", label="0.8")
    lengths = sorted({r["length"]: r["tokens"] for r in rows}.items(), key=lambda kv: kv[1])
    ax.set_xscale("log")
    ax.set_xticks([t for _, t in lengths], [f"{name} (~{t})" for name, t in lengths])
    ax.xaxis.set_minor_locator(plt.NullLocator())
    ax.set(xlabel="prompt length (tokens)", ylabel="full-cache score (95 % interval)", ylim=(-0.05, 1.08),
           title="SmolLM2-LLaVA judge vs prompt length (HF path)")
    ax.margins(x=0.25)
    ax.legend(fontsize=8, loc="upper right")
    return fig


if __name__ == "__main__":
    main()
