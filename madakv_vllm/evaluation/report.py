"""madakv-eval's results: memory per setting from the counters, the summary table, the plot."""
from __future__ import annotations

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


def summarize(rows: list[dict], memory: dict[tuple, dict]) -> list[dict]:
    groups: dict[tuple, list[float]] = defaultdict(list)
    for row in rows:
        groups[(row["policy"], row["budget"], row["task"])].append(row["score"])
        groups[(row["policy"], row["budget"], "ALL")].append(row["score"])
    return [dict(policy=p, budget="" if b is None else b, task=t, samples=len(s), score=sum(s) / len(s),
                 **(memory.get((p, b), NOT_MEASURED) if t == "ALL" else NOT_MEASURED))
            for (p, b, t), s in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0, kv[0][2]))]


def plot(summary: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    overall = [r for r in summary if r["task"] == "ALL"]
    measured = any(r["kv_kept"] != "" for r in overall)
    fig, axes = plt.subplots(1, 2 if measured else 1, figsize=(11 if measured else 6, 4), squeeze=False)
    for policy in sorted({r["policy"] for r in overall} - {"none"}):
        mine = sorted((r for r in overall if r["policy"] == policy), key=lambda r: r["budget"])
        axes[0][0].plot([r["budget"] for r in mine], [r["score"] for r in mine], marker="o", label=policy)
        if measured:
            axes[0][1].plot([r["budget"] for r in mine], [r["kv_kept"] or 1.0 for r in mine], marker="o", label=policy)
    for r in overall:
        if r["policy"] == "none":
            axes[0][0].axhline(r["score"], color="gray", linestyle="--", label="full cache")
    axes[0][0].set(xscale="log", xlabel="KV budget (ratio of the prompt)", ylabel="mean score", title="score vs budget")
    axes[0][0].legend()
    if measured:
        axes[0][1].axhline(1.0, color="gray", linestyle="--", label="full cache")
        axes[0][1].set(xscale="log", yscale="log", xlabel="KV budget (ratio of the prompt)",
                       ylabel="prompt KV kept (server counters)", title="memory vs budget")
        axes[0][1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True
