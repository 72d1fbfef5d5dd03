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
With `--probe recall`: whether a fact of the prompt is still restated after a long output. The
output is forced, token by token through decode (so every compaction runs while it is
"generated"): `--filler` tokens of a neutral paragraph, then the lead of the full cache's own
answer ("The secret word is "); the judge's next 8 tokens are scored as the suite scores them.
(Asked again in a new user turn instead, the judge fails even with the full cache.)
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
    p.add_argument("--probe", choices=["drift", "recall"], default="drift")
    p.add_argument("--filler", type=int, default=256, help="(recall) forced tokens before the answer's lead")
    p.add_argument("--out", default=None, help="default: benchmarks/results/decode_fidelity (or decode_recall)")
    p.add_argument("--summarize", nargs="+", metavar="SAMPLES.jsonl", help="only summarize these samples files")
    args = p.parse_args()
    sys.path.insert(0, str(HERE))
    args.out = args.out or str(HERE / "results" / ("decode_fidelity" if args.probe == "drift" else "decode_recall"))
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
    if args.probe == "recall":
        return recall(args, model, processor, samples, settings)
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


FILLER = ("The weather was mild and the market in the old town was busy all day. Traders set out fruit, bread "
          "and cloth, and visitors walked slowly between the stalls, talking about the harvest and the roads. ")


def recall(args, model, processor, samples, settings) -> list[dict]:
    """The recall probe: a forced filler and the answer's lead, then the judge's own 8 tokens."""
    import torch
    from tqdm import tqdm
    from transformers import LogitsProcessor

    from _stamp import hf_inputs
    from madakv_vllm.evaluation.milebench import scorer_for
    from madakv_vllm.hf import generate_with_eviction

    tokenizer = processor.tokenizer

    class Forced(LogitsProcessor):
        """The first len(ids) steps emit `ids` whatever the model prefers; then its own choice."""

        def __init__(self, ids):
            self.ids, self.step = ids, 0

        def __call__(self, input_ids, scores):
            if self.step < len(self.ids):
                scores = torch.full_like(scores, float("-inf")).index_fill_(1, torch.tensor([self.ids[self.step]]), 0)
            self.step += 1
            return scores

    filler = tokenizer(FILLER * (args.filler // 30 + 1), add_special_tokens=False)["input_ids"][:args.filler]
    rows = []
    with open(f"{args.out}-samples.jsonl", "a") as jsonl:
        for sample in tqdm(samples, desc="prompts", unit="prompt"):
            inputs = hf_inputs(processor, sample)
            n = inputs["input_ids"].shape[1]
            score = scorer_for(sample)
            with torch.inference_mode():
                plain = processor.decode(model.generate(**inputs, max_new_tokens=12, do_sample=False)[0, n:],
                                         skip_special_tokens=True)
            # the full cache's own lead-in to its answer ("The secret word is "), the fact left out
            lead = plain.split(sample.answer)[0] if sample.answer and sample.answer in plain else ""
            forced = filler + tokenizer(lead, add_special_tokens=False)["input_ids"]
            for name, policy in settings.items():
                started = time.perf_counter()
                with torch.inference_mode():
                    out, report = generate_with_eviction(model, inputs, policy, max_new_tokens=len(forced) + 8,
                                                         do_sample=False, logits_processor=[Forced(forced)])
                prediction = processor.decode(out[0, n + len(forced):], skip_special_tokens=True)
                rows.append(dict(task=sample.task, sample_id=sample.sample_id, setting=name, prompt_tokens=n,
                                 answer=sample.answer, lead=lead, prediction=prediction,
                                 recall=float(score(lead + prediction, sample.answer, sample.choices)),
                                 decode_compactions=len(report.decode_compactions),
                                 seconds=round(time.perf_counter() - started, 2)))
                jsonl.write(json.dumps(rows[-1]) + "\n")
                jsonl.flush()
    return rows


def write(args, rows: list[dict]) -> None:
    if args.probe == "recall":
        return write_recall(args, rows)
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
    _save(args.out, summary, draw, tokens=args.tokens)


def write_recall(args, rows: list[dict]) -> None:
    from madakv_vllm.evaluation.report import interval, paired_p

    def scores(setting):
        return {(r["task"], r["sample_id"]): r["recall"] for r in rows if r["setting"] == setting}

    summary = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        got = scores(setting)
        values = list(got.values())
        summary.append(dict(setting=setting, n=len(values), recall=round(sum(values) / len(values), 3),
                            recall_ci=[round(x, 3) for x in interval(values)],
                            p_vs_full=None if setting == "full cache" else
                            round(paired_p(got, scores("full cache")), 4),
                            decode_compactions=round(statistics.mean(r["decode_compactions"] for r in rows
                                                                     if r["setting"] == setting), 1)))
        s = summary[-1]
        print(f"{setting:>12s}: recall {s['recall']:.2f} {s['recall_ci']} (p vs full {s['p_vs_full']}), "
              f"{s['decode_compactions']} compactions (n={s['n']})")
    _save(args.out, summary, draw_recall, filler=args.filler)


def _save(out: str, summary: list[dict], draw_fn, **fields) -> None:
    """Either probe's summary, stamped, with what both ran (judge, split, policy)."""
    from _stamp import stamp, write_results

    write_results(out, dict(stamp=stamp(), model="SmolLM2-LLaVA judge, HF reference path, fp32", **fields,
                            split="dev (seed 0)", policy="madakv, budget 1.0 (prompt kept), decode slack 0.25",
                            summary=summary), draw_fn)


def _bars_with_intervals(plt, result: dict, key: str, ylabel: str, title: str):
    """One bar per setting of result["summary"]: its `key` with the 95 % interval `key`_ci."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    rows = result["summary"]
    values = [r[key] for r in rows]
    errors = [[v - r[f"{key}_ci"][0] for v, r in zip(values, rows)],
              [r[f"{key}_ci"][1] - v for v, r in zip(values, rows)]]
    ax.bar([r["setting"] for r in rows], values, yerr=errors, capsize=3, color=[f"C{i}" for i in range(len(rows))])
    ax.set(ylim=(0, 1.05), ylabel=ylabel, title=f"{title} ({result['split']}, n = {rows[0]['n']} prompts)")
    ax.title.set_fontsize(9)
    fig.tight_layout()
    return fig


def draw_recall(plt, result: dict):
    """Facts restated after the forced filler, per cap, with 95 % intervals."""
    return _bars_with_intervals(plt, result, "recall", f"fact restated after {result['filler']} output tokens",
                                "Eviction during decode: recall on the judge")


def draw(plt, result: dict):
    """Agreement with the full cache per cap, with 95 % intervals."""
    return _bars_with_intervals(plt, result, "agreement",
                                f"share of the first {result['tokens']} tokens equal to the full cache's",
                                "Eviction during decode on the judge")


if __name__ == "__main__":
    main()
