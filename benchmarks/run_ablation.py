"""MadaKV ablation next to the baselines, on the HF reference path (where layers may keep
unequal counts, unlike vLLM's one-block-table regime):

    python benchmarks/run_ablation.py [--samples 12] [--budgets 0.05 0.1 0.2]

- MPA on/off x HCC off / paper / balanced (the balanced HCC is ours, see policies/madakv.py),
- theta 0.8 / 0.95 for both HCC variants (theta only shapes HCC's layer demand),
- proxy window 8 / 64 (MPA only, the configuration vLLM runs),
- max-pooling of the scores inside a modality over 3 / 7 neighbours (ours, beyond the paper),
- SnapKV (max-pool 7), PyramidKV, StreamingLLM.
Every sample is prefilled once and every variant decodes from its own evicted copy of that cache
(`generate_sweep`, token-equal to running each variant alone). Model: SmolLM2-LLaVA (fp32 on
CPU), data: the synthetic suite (seed 0). Writes benchmarks/results/ablation.json + .png and
prints a markdown table (mean score over the tasks, per budget).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


def variants(budget: float) -> dict:
    from madakv_vllm.policies import MadaKV, PyramidKV, SnapKV, StreamingLLM

    out = {}
    for mpa in (False, True):
        for hcc in ("off", "paper", "balanced"):
            name = f"MPA {'on' if mpa else 'off'}, HCC {hcc}"
            out[name] = MadaKV(budget=budget, mpa=mpa, hcc=hcc != "off", hcc_variant="paper" if hcc == "off" else hcc)
    for hcc in ("paper", "balanced"):
        for theta in (0.8, 0.95):
            out[f"MPA on, HCC {hcc}, θ {theta}"] = MadaKV(budget=budget, hcc_variant=hcc, theta=theta)
    for window in (8, 64):
        out[f"MPA on, HCC off, window {window}"] = MadaKV(budget=budget, hcc=False, window=window)
    for pool in (3, 7):
        out[f"MPA on, HCC balanced, pool {pool}"] = MadaKV(budget=budget, pool=pool)
    out["SnapKV"] = SnapKV(budget=budget)
    out["PyramidKV"] = PyramidKV(budget=budget)
    out["StreamingLLM"] = StreamingLLM(budget=budget)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=12, help="samples per task (default lengths: see synthetic.py)")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    p.add_argument("--max-new-tokens", type=int, default=16)
    args = p.parse_args()
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    from _stamp import hf_judge, hf_sweep, stamp, synthetic_suite, write_results

    from madakv_vllm.evaluation.milebench import list_tasks, load_task

    data = synthetic_suite(args.samples)
    model, processor = hf_judge()
    policies = {("full cache", None): None}
    for budget in args.budgets:
        policies.update({(name, budget): policy for name, policy in variants(budget).items()})
    scores: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    samples = [s for task in list_tasks(data) for s in load_task(data, task)]
    started = time.time()
    for sample, _, key, _, score, _ in hf_sweep(model, processor, samples, policies, args.max_new_tokens, "ablation"):
        scores[key][sample.task].append(score)
    tasks = sorted({s.task for s in samples})
    names = list(dict.fromkeys(name for name, _ in policies))
    mean = {key: sum(sum(v) / len(v) for v in per_task.values()) / len(per_task) for key, per_task in scores.items()}
    full = mean[("full cache", None)]
    head = "| variant | " + " | ".join(f"{b:.0%}" for b in args.budgets) + " |"
    lines = [f"Mean score over {', '.join(tasks)} ({args.samples} samples each); full cache {full:.2f}.", "",
             head, "|---" * (len(args.budgets) + 1) + "|"]
    for name in names[1:]:
        lines.append(f"| {name} | " + " | ".join(f"{mean[(name, b)]:.2f}" for b in args.budgets) + " |")
    print("\n".join(lines))
    table = {name: {("full" if b is None else str(b)): {t: sum(scores[(name, b)][t]) / len(scores[(name, b)][t])
                                                        for t in tasks} for (n_, b) in policies if n_ == name}
             for name in names}

    def draw(plt):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in names[1:]:
            style = "--" if name in ("SnapKV", "PyramidKV", "StreamingLLM") else "-"
            ax.plot(args.budgets, [mean[(name, b)] for b in args.budgets], style, marker="o", label=name)
        ax.axhline(full, color="gray", linestyle=":", label="full cache")
        ax.set(xscale="log", xlabel="KV budget (ratio of the prompt)", ylabel="mean score",
               title="MadaKV ablation, SmolLM2-LLaVA, synthetic suite (HF path)")
        ax.legend(fontsize=6, ncol=2)
        return fig

    write_results(HERE / "results" / "ablation", dict(
        stamp=stamp(), model="SmolLM2-LLaVA fp32 (HF reference path)", budgets=args.budgets,
        samples_per_task=args.samples, max_new_tokens=args.max_new_tokens, seconds=round(time.time() - started),
        scores=table, mean={f"{name}@{b}": v for (name, b), v in mean.items()}, markdown="\n".join(lines)), draw)


if __name__ == "__main__":
    main()
