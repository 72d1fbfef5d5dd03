"""MadaKV ablation next to the baselines, on the HF reference path (where layers may keep
unequal counts, unlike vLLM's one-block-table regime):

    python benchmarks/run_ablation.py [--samples 100] [--budgets 0.05 0.1 0.2] [--variants NAME ...]

- MPA on/off x HCC off / paper / balanced (the balanced HCC is ours, see policies/madakv.py),
- theta 0.8 / 0.95 for both HCC variants (theta only shapes HCC's layer demand),
- proxy window 8 / 64 (MPA only, the configuration vLLM runs); every other MadaKV variant keeps
  the old default window 32, except "MPA on, HCC balanced, window 8", the policy's defaults,
- max-pooling of the scores inside a modality over 3 / 7 neighbours (ours, beyond the paper),
- uniform layers (`layer_buckets=1`: what vLLM runs with its default single KV-cache group),
- issue 18's levers on what vLLM runs (MPA, HCC off, window 8): MPA off, sinks 4, whole spans of
  8 / 16 tokens (`span`), MPA's coverage split (`mpa_split: coverage`), value-weighted scores
  (`value_weighted`),
- with span 8: proxy windows of 12 / 16 against 8, MPA's quotas in whole spans (`mpa_quota: spans`),
  MPA off at window 12 (against today's defaults: window 12, span 8, quotas in spans), MPA's
  quotas as floors in whole spans (`mpa_quota: floors`), only the smaller one as a floor
  (`mpa_quota: floor`), the smaller quota rounded to the nearest span (`mpa_quota: nearest`),
- eviction during prefill, early chunks scored by their own window, the running mean of the
  windows, each key's distance from the mean key (`prefill_scores: novelty`), or the question's
  window forwarded alone (`ahead`) or right after each chunk (`appended`),
- SnapKV (max-pool 7), PyramidKV, StreamingLLM.
Every sample is prefilled once and every variant decodes from its own evicted copy of that cache
(`generate_sweep`, token-equal to running each variant alone). Model: SmolLM2-LLaVA (fp32 on
CPU), data: the synthetic suite (seed 0), its tasks' samples taking turns. Writes every sample to
benchmarks/results/ablation-samples.jsonl as it goes (`--summarize FILE...` tables a run stopped
early, or the shards of a run split with --tasks), then ablation.json (score per variant, budget
and task with its Wilson 95 % interval) + .png and prints a markdown table (mean over the tasks).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Every variant is tested against this one on the same samples: the policy's defaults before the
# window ablation moved MadaKV's window from 32 to 8 (the variants keep 32 unless named otherwise).
REFERENCE = "MPA on, HCC balanced"
# what `--kv-eviction madakv` ran under vLLM (one KV-cache group), newest first
VLLM_DEFAULTS = ("MPA on, HCC off, window 12, span 8, quota in spans", "MPA on, HCC off, window 8, span 8",
                 "MPA on, HCC off, window 8")


def reference_name(name: str) -> str:
    return f"{name}, window 32" if name == REFERENCE else name


def variants(budget: float) -> dict:
    from madakv_vllm.policies import MadaKV, PyramidKV, SnapKV, StreamingLLM

    # Every variant names what it changes; the rest is pinned to the defaults it was measured
    # against, so a later change of a default does not change what a name means.
    def madakv(**options):  # window 32 unless a variant names its window (the old default, see REFERENCE)
        return MadaKV(budget=budget, **{"window": 32, "span": 1, "mpa_quota": "tokens", "prefill_scores": "chunk",
                                        **options})

    def uniform(**options):  # what vLLM ran by default before the levers: MPA on, HCC off, window 8, tokens
        return MadaKV(budget=budget, **{"hcc": False, "window": 8, "span": 1, "mpa_quota": "tokens",
                                        "prefill_scores": "chunk", **options})

    out = {}
    for mpa in (False, True):
        for hcc in ("off", "paper", "balanced"):
            name = f"MPA {'on' if mpa else 'off'}, HCC {hcc}"
            out[name] = madakv(mpa=mpa, hcc=hcc != "off", hcc_variant="paper" if hcc == "off" else hcc)
    for hcc in ("paper", "balanced"):
        for theta in (0.8, 0.95):
            out[f"MPA on, HCC {hcc}, θ {theta}"] = madakv(hcc_variant=hcc, theta=theta)
    for window in (8, 64):
        out[f"MPA on, HCC off, window {window}"] = madakv(hcc=False, window=window)  # window 8: uniform()
    out["MPA on, HCC balanced, window 8"] = madakv(window=8)  # the policy's defaults then
    # what vLLM runs by default (one KV-cache group: uniform layers), with StreamingLLM's sinks
    out["MPA on, HCC off, window 8, sinks 4"] = uniform(sinks=4)
    out["MPA off, HCC off, window 8"] = uniform(mpa=False)
    for span in (8, 16):
        out[f"MPA on, HCC off, window 8, span {span}"] = uniform(span=span)
    out["MPA coverage, HCC off, window 8"] = uniform(mpa_split="coverage")
    out["MPA on, HCC off, window 8, values"] = uniform(value_weighted=True)
    # with the lever that won alone on the dev split (span 8): does MPA still earn its place, do values add
    out["MPA off, HCC off, window 8, span 8"] = uniform(mpa=False, span=8)
    out["MPA on, HCC off, window 8, span 8, values"] = uniform(span=8, value_weighted=True)
    out["MPA on, HCC off, window 8, span 8, sinks 4"] = uniform(span=8, sinks=4)
    # the proxy window again, now with spans: at 8 it holds the 6 chat-template tokens that end every
    # prompt and the question's last 2 tokens; longer windows see more of the question, leave fewer slots
    for window in (12, 16):
        out[f"MPA on, HCC off, window {window}, span 8"] = uniform(span=8, window=window)
    # MPA's quotas in whole spans: pictures draw 2-3 % of a head's window attention here, 4-6 slots at
    # 20 %, less than one span of 8, so the span that selection keeps whole is cut
    out["MPA on, HCC off, window 8, span 8, quota in spans"] = uniform(span=8, mpa_quota="spans")
    out["MPA on, HCC off, window 12, span 8, quota in spans"] = uniform(span=8, window=12, mpa_quota="spans")
    # does MPA still earn its place at the defaults that round chose (MPA off has no quotas to round)
    out["MPA off, HCC off, window 12, span 8"] = uniform(mpa=False, span=8, window=12)
    # MPA's quotas as floors in whole spans rounded down, the rest to the best spans of either modality
    # (round 5: rounding the pictures' one-slot quota up to a span cost the pass key at 5 %)
    out["MPA on, HCC off, window 12, span 8, quota floors"] = uniform(span=8, window=12, mpa_quota="floors")
    # only the smaller quota as a floor (floors for both left the pictures ~nothing at 20 %: the text's
    # floor took all but a few slots)
    out["MPA on, HCC off, window 12, span 8, quota floor"] = uniform(span=8, window=12, mpa_quota="floor")
    # the smaller quota rounded to the nearest whole span (round 7's floor was MPA off in all but 2 of 2,000
    # replies, and lost MPA off's text among noisy pictures at 50 %)
    out["MPA on, HCC off, window 12, span 8, quota nearest"] = uniform(span=8, window=12, mpa_quota="nearest")
    # each quota rounded up to whole spans as a ceiling, the best spans filling the budget under them
    # (round 8: a quota rounded up is a guarantee that costs the pass key at 5 %, one rounded to the
    # nearest span keeps no picture; a ceiling neither forces a span nor forbids one)
    out["MPA on, HCC off, window 12, span 8, quota caps"] = uniform(span=8, window=12, mpa_quota="caps")
    # eviction during prefill (--prefill-chunk tokens per chunk), each chunk scored by its own window
    # or by the running mean of every chunk's window; slack 0.5 of the kept count
    out["MPA on, HCC off, window 8, span 8, during prefill"] = uniform(span=8, during_prefill=True)
    out["MPA on, HCC off, window 8, span 8, during prefill, running"] = uniform(span=8, during_prefill=True,
                                                                                 prefill_scores="running")
    # early chunks scored by a question-agnostic score (each key's distance from the mean key, KeyDiff's
    # observation) or by a proxy for the question: the prompt's last window tokens forwarded alone, or
    # right after the chunk over what is held, their keys dropped again (FINCH's rule); MPA's quotas in
    # spans (the default when these were measured)
    def during_prefill(**options):
        return uniform(span=8, mpa_quota="spans", during_prefill=True, **options)

    for scores in ("novelty", "ahead", "appended"):
        out[f"MPA on, HCC off, window 8, span 8, quota in spans, during prefill, {scores}"] = during_prefill(
            prefill_scores=scores)
    # a larger slack: fewer compactions before the question, more held between them
    out["MPA on, HCC off, window 8, span 8, quota in spans, during prefill, appended, slack 1.0"] = during_prefill(
        prefill_scores="appended", prefill_slack=1.0)
    for pool in (3, 7):
        out[f"MPA on, HCC balanced, pool {pool}"] = madakv(pool=pool)
    # every layer keeps the same count: what vLLM runs with its default single KV-cache group
    out["MPA on, HCC balanced, uniform layers"] = madakv(layer_buckets=1)
    out["SnapKV"] = SnapKV(budget=budget)
    out["PyramidKV"] = PyramidKV(budget=budget)
    out["StreamingLLM"] = StreamingLLM(budget=budget)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=100, help="samples per task (default lengths: see synthetic.py)")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--variants", nargs="+", help="only these variants (names as in the table; with --summarize: "
                                                 "only these variants' rows)")
    p.add_argument("--tasks", nargs="+", help="only these tasks (e.g. to split a run over processes)")
    p.add_argument("--start", type=int, default=0, help="skip each task's first samples (to extend a stopped run)")
    p.add_argument("--seed", type=int, default=0, help="suite seed: 0 the dev split (options are chosen on it), "
                                                       "1 the test split (never used to choose)")
    p.add_argument("--reference", default=REFERENCE, help="the variant every other one is tested against")
    p.add_argument("--prefill-chunk", type=int, default=128, help="prefill chunk of the variants that evict "
                                                                   "during prefill")
    p.add_argument("--no-full-cache", action="store_true", help="skip the full cache (another run of the same "
                                                                 "samples has it; --summarize both)")
    p.add_argument("--out", default=str(HERE / "results" / "ablation"), help="OUT.json, OUT.png, OUT-samples.jsonl")
    p.add_argument("--summarize", nargs="+", metavar="JSONL",
                   help="only tabulate these samples files (a run stopped early, or shards of one run)")
    args = p.parse_args()
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    if args.summarize:
        rows = [row for path in args.summarize for line in Path(path).read_text().splitlines()
                if (row := json.loads(line))["policy"] == "full cache" or not args.variants
                or row["policy"] in args.variants]
        # runs over the same samples repeat settings (the full cache, a shared variant): greedy
        # decoding gives the same reply, so each (sample, setting) counts once
        rows = list({(r["task"], r["sample_id"], r.get("seed", 0), r["policy"], r["budget"]): r for r in rows}.values())
        args.budgets = sorted({r["budget"] for r in rows if r["budget"] is not None})
        write(args, rows, None)
    else:
        started = time.time()
        rows = run(args)
        write(args, rows, time.time() - started)


def run(args) -> list[dict]:
    from _stamp import hf_judge, hf_sweep, suite_samples, synthetic_suite

    data = synthetic_suite(args.samples, seed=args.seed)
    model, processor = hf_judge()
    policies = {} if args.no_full_cache else {("full cache", None): None}
    for budget in args.budgets:
        policies.update({(name, budget): policy for name, policy in variants(budget).items()
                         if not args.variants or name in args.variants})
    samples = suite_samples(data, args.tasks, args.start)
    rows = []
    with open(f"{args.out}-samples.jsonl", "w") as jsonl:
        for sample, _, (name, budget), prediction, score, _ in hf_sweep(model, processor, samples, policies,
                                                                        args.max_new_tokens, "ablation",
                                                                        args.prefill_chunk):
            rows.append(dict(task=sample.task, sample_id=sample.sample_id, seed=args.seed, policy=name, budget=budget,
                             answer=sample.answer, prediction=prediction, score=score))
            jsonl.write(json.dumps(rows[-1]) + "\n")
            jsonl.flush()
    return rows


def write(args, rows: list[dict], seconds: float | None) -> None:
    from _stamp import stamp, write_results
    from madakv_vllm.evaluation.report import paired_comparison, summarize

    summary = summarize(rows, {})
    cell = {(r["policy"], r["budget"] or None, r["task"]): r for r in summary}
    tasks = sorted({r["task"] for r in rows})
    counts = [r["samples"] for r in summary if r["task"] != "ALL"]
    n = min(counts)
    each = f"{n}" if n == max(counts) else f"{n}-{max(counts)} (by setting)"  # runs of several lengths, summarized
    names = [name for name in dict.fromkeys(r["policy"] for r in rows) if name != "full cache"]
    full = cell.get(("full cache", None, "ALL"))
    lines = [f"Mean score over {', '.join(tasks)} ({each} samples each, pooled Wilson 95 % interval); full cache "
             + (f"{full['score']:.2f} [{full['ci_low']:.2f}, {full['ci_high']:.2f}]." if full else "not run."), "",
             f"Each other variant: its difference to the reference ({reference_name(args.reference)}) on the samples "
             "both ran and the exact McNemar p of that difference on the same samples (p < 0.05: significant).", "",
             "| variant | " + " | ".join(f"{b:.0%}" for b in args.budgets) + " |",
             "|---" * (len(args.budgets) + 1) + "|"]
    paired = defaultdict(dict)  # (variant, budget) -> {sample: score}, for the paired test
    for r in rows:
        paired[(r["policy"], r["budget"])][(r["task"], r["sample_id"])] = r["score"]

    def against_reference(name, budget) -> str:
        if name == args.reference or (args.reference, budget) not in paired:
            return ""
        diff, _, _, p = paired_comparison(paired[(name, budget)], paired[(args.reference, budget)])
        return f"; {diff:+.2f}, p {'< 0.001' if p < 0.001 else f'{p:.3f}'}"

    for name in names:
        lines.append(f"| {name} | " + " | ".join(
            f"{c['score']:.2f} [{c['ci_low']:.2f}, {c['ci_high']:.2f}]{against_reference(name, b)}"
            if (c := cell.get((name, b, "ALL"))) else "-" for b in args.budgets) + " |")
    print("\n".join(lines))

    write_results(args.out, dict(
        stamp=stamp(), model="SmolLM2-LLaVA judge fp32 (HF reference path)", budgets=args.budgets,
        reference=args.reference, seeds=sorted({r.get("seed", 0) for r in rows}),
        samples_per_task=n, max_new_tokens=args.max_new_tokens, seconds=None if seconds is None else round(seconds),
        rows=[dict(variant=r["policy"], budget=r["budget"] or None, task=r["task"], score=r["score"], n=r["samples"],
                   ci_low=r["ci_low"], ci_high=r["ci_high"]) for r in summary],
        markdown="\n".join(lines)), draw if full else None)  # the plot needs the full cache line


def draw(plt, result: dict):
    """ablation.png from ablation.json: one panel per budget, a bar per variant with its mean
    score over the tasks, its 95 % interval and its value; the full cache as a line. The
    reference and vLLM's default ("MPA on, HCC off, window 8") are marked."""
    rows = [r for r in result["rows"] if r["task"] == "ALL"]
    reference = result.get("reference", REFERENCE)
    # vLLM's default as of this result: the newest of them that the result has
    vllm_default = next((n for n in VLLM_DEFAULTS if any(r["variant"] == n for r in rows)), None)
    (full,) = [r for r in rows if r["variant"] == "full cache"]
    tabled = [line.split(" | ")[0][2:] for line in result["markdown"].splitlines()[4:] if line.startswith("| ")]
    names = [name for name in tabled if name != "variant"] or [  # the table's order
        name for name in dict.fromkeys(r["variant"] for r in rows) if name != "full cache"]
    budgets = result["budgets"]
    fig, axes = plt.subplots(1, len(budgets), figsize=(14, 5), sharey=True)
    for ax, budget in zip(axes, budgets):
        cells = {r["variant"]: r for r in rows if r["budget"] == budget}
        ys = range(len(names))
        scores = [cells[n]["score"] if n in cells else 0 for n in names]
        colors = ["C2" if n == vllm_default else "C1" if n == reference else "C0" for n in names]
        ax.barh(ys, scores, color=colors, alpha=0.85, xerr=[
            [cells[n]["score"] - cells[n]["ci_low"] if n in cells else 0 for n in names],
            [cells[n]["ci_high"] - cells[n]["score"] if n in cells else 0 for n in names]], capsize=2,
            error_kw={"elinewidth": 0.8})
        for y, name in zip(ys, names):
            ax.text(0.02, y, f"{cells[name]['score']:.2f}" if name in cells else "not run", va="center",
                    fontsize=7, color="white" if name in cells and cells[name]["score"] > 0.12 else "black")
        ax.axvline(full["score"], color="gray", linestyle=":")
        ax.set(xlim=(0, 1), title=f"budget {budget:.0%}", xlabel="mean score (95 % interval)")
        ax.text(full["score"], len(names) - 0.4, f"full cache {full['score']:.2f}", fontsize=7, ha="right",
                color="gray")
    axes[0].set_yticks(list(range(len(names))), names, fontsize=8)
    axes[0].invert_yaxis()
    fig.text(0.01, 0.01, f"{result['model']}; {result['samples_per_task']} samples per task; orange: the "
                         f"reference ({reference_name(reference)})"
                         + (f", green: vLLM's default as of this result ({vllm_default})" if vllm_default else ""),
             fontsize=7)
    return fig


if __name__ == "__main__":
    main()
