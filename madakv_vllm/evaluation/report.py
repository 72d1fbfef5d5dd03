"""madakv-eval's results: memory per setting from the counters, the summary table, the plot."""
from __future__ import annotations

import math
import random
from collections import defaultdict
from pathlib import Path

NOT_MEASURED = dict(kv_kept="", blocks_freed="", evicted_requests="", prefix_cache="")


def memory_of(before: dict | None, after: dict | None, rows: list[dict]) -> dict:
    """What one setting kept, from the counters' difference: share of the prompt KV kept by the
    requests that evicted, and blocks freed per request. Blank when the server exports no counters."""
    if not after:  # the counters appear at the server's first stats tick
        return dict(NOT_MEASURED)
    before = before or {}
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in ("requests", "blocks_freed", "kept", "evicted")}
    moved = delta["kept"] + delta["evicted"]
    return dict(kv_kept=round(delta["kept"] / moved, 4) if moved else 1.0,
                blocks_freed=round(delta["blocks_freed"] / max(1, len(rows)), 2),
                evicted_requests=int(delta["requests"]), prefix_cache="")


def interval(scores: list[float], z: float = 1.959964, resamples: int = 2000) -> tuple[float, float]:
    """95 % interval of a mean score: Wilson's for 0/1 scores (exact-match tasks), a seeded
    percentile bootstrap for fractional ones (ROUGE-L)."""
    n = len(scores)
    if n == 0:
        return 0.0, 1.0
    mean = sum(scores) / n
    if all(score in (0, 1) for score in scores):
        centre = (mean + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return max(0.0, centre - half), min(1.0, centre + half)
    rng = random.Random(0)
    means = sorted(sum(rng.choices(scores, k=n)) / n for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def paired_comparison(first: dict, second: dict) -> tuple[float, int, int, float]:
    """Two settings' 0/1 scores on the same samples ({sample key: score}), on the samples both
    ran: (difference of the means, samples only the first answered, only the second, exact
    two-sided McNemar p). The right test when both ran on the same samples, and more powerful
    than comparing their intervals."""
    keys = first.keys() & second.keys()
    wins = sum(1 for k in keys if first[k] > second[k])
    losses = sum(1 for k in keys if first[k] < second[k])
    difference = sum(first[k] - second[k] for k in keys) / len(keys) if keys else 0.0
    n = wins + losses
    if n == 0:
        return difference, wins, losses, 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2 ** n
    return difference, wins, losses, min(1.0, 2 * tail)


def paired_p(first: dict, second: dict) -> float:
    """The exact McNemar p of `paired_comparison`."""
    return paired_comparison(first, second)[3]


def summarize(rows: list[dict], memory: dict[tuple, dict]) -> list[dict]:
    """Mean score per policy, budget and task (and over all tasks) with its 95 % interval."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for row in rows:
        groups[(row["policy"], row["budget"], row["task"])].append(row["score"])
        groups[(row["policy"], row["budget"], "ALL")].append(row["score"])
    summary = []
    for (p, b, t), s in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0, kv[0][2])):
        low, high = interval(s)
        summary.append(dict(policy=p, budget="" if b is None else b, task=t, samples=len(s), score=sum(s) / len(s),
                            ci_low=round(low, 4), ci_high=round(high, 4),
                            **(memory.get((p, b), NOT_MEASURED) if t == "ALL" else NOT_MEASURED)))
    return summary


def results_rows(summary: list[dict], setting: str) -> list[dict]:
    """The summary as the rows of benchmarks/results/accuracy.json (full cache as policy "none")."""
    return [dict(setting=setting, policy=r["policy"], budget=r["budget"] if r["budget"] != "" else None, task=r["task"],
                 score=r["score"], n=r["samples"], ci_low=r["ci_low"], ci_high=r["ci_high"],
                 kv_kept=r["kv_kept"] if r["kv_kept"] != "" else None) for r in summary]


def budget_axis(ax, budgets) -> None:
    """A log x axis of KV budgets (ratios of the prompt) ticked at the budgets and labelled as
    percentages (5 %, 10 %, ...), not as powers of ten."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(sorted(set(budgets))))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x * 100:.3g} %"))
    ax.xaxis.set_minor_locator(NullLocator())


def draw_scores(plt, summary: list[dict], kept: str = "server counters"):
    """The figure of `plot`: mean score (with its interval, each value written next to its point)
    and KV kept vs budget per policy. `summary` rows are summarize()'s or results_rows()' (no
    budget or KV kept: "" or None)."""
    overall = [r for r in summary if r["task"] == "ALL"]
    measured = any(r["kv_kept"] not in ("", None) for r in overall if r["policy"] != "none")
    fig, axes = plt.subplots(1, 2 if measured else 1, figsize=(13 if measured else 7, 4.8), squeeze=False,
                             gridspec_kw={"width_ratios": [2, 1]} if measured else None)
    budgets = sorted({r["budget"] for r in overall if r["policy"] != "none"})
    for i, policy in enumerate(sorted({r["policy"] for r in overall} - {"none"})):
        mine = sorted((r for r in overall if r["policy"] == policy), key=lambda r: r["budget"])
        xs, scores = [r["budget"] for r in mine], [r["score"] for r in mine]
        errors = [[s - r["ci_low"] for s, r in zip(scores, mine)], [r["ci_high"] - s for s, r in zip(scores, mine)]]
        axes[0][0].errorbar(xs, scores, yerr=errors, marker="o", capsize=3, label=policy, color=f"C{i}")
        for x, score in zip(xs, scores):  # each value beside its point, on the policy's side
            axes[0][0].annotate(f"{score:.2f}", (x, score), textcoords="offset points", fontsize=6.5,
                                xytext=(9 if i % 2 else -9, 0), ha="left" if i % 2 else "right", va="center",
                                color=f"C{i}")
        if measured:
            axes[0][1].plot(xs, [r["kv_kept"] or 1.0 for r in mine], marker="o", label=policy, color=f"C{i}")
    for r in overall:
        if r["policy"] == "none":
            axes[0][0].axhline(r["score"], color="gray", linestyle="--",
                               label=f"full cache {r['score']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]")
            axes[0][0].axhspan(r["ci_low"], r["ci_high"], color="gray", alpha=0.15)
    budget_axis(axes[0][0], budgets)
    axes[0][0].set(xlabel="KV budget (share of the prompt)", ylabel="mean score over the tasks (95 % interval)",
                   title="score vs budget", ylim=(-0.03, 1.05))
    axes[0][0].margins(x=0.08)
    axes[0][0].legend(fontsize=7, loc="upper left")
    if measured:
        kept_values = sorted({r["kv_kept"] or 1.0 for r in overall if r["policy"] != "none"})
        axes[0][1].axhline(1.0, color="gray", linestyle="--", label="full cache")
        budget_axis(axes[0][1], budgets)
        axes[0][1].set_yscale("log")
        axes[0][1].set_yticks(kept_values + [1.0], [f"{k * 100:.3g} %" for k in kept_values + [1.0]])
        axes[0][1].yaxis.set_minor_locator(plt.NullLocator())
        axes[0][1].set(xlabel="KV budget (share of the prompt)", ylabel=f"prompt KV kept ({kept})",
                       title="memory vs budget")
        axes[0][1].legend(fontsize=7)
    return fig


def plot(summary: list[dict], path: Path, kept: str = "server counters") -> bool:
    """Score (with intervals) and KV kept vs budget; `kept` says where the kept share was measured.
    (benchmarks/tables.py redraws the committed plots with draw_scores, titled with their stamp.)"""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig = draw_scores(plt, summary, kept)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
