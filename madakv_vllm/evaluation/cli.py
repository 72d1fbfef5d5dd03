"""`madakv-eval`: score policies x budgets on MileBench-layout tasks against an OpenAI-compatible
endpoint (a running `vllm serve MODEL --kv-eviction madakv ...`). One server covers the whole
sweep: each request picks its policy and budget through `vllm_xargs`.

    madakv-eval --data DATA_ROOT --endpoint http://127.0.0.1:8000/v1 \\
        --policies none madakv snapkv --budgets 0.05 0.1 0.2 0.5 --out eval/run1

Writes OUT/samples.jsonl (one line per sample and setting), OUT/summary.csv (mean score per
policy, budget and task) and OUT/scores.png (score vs budget per policy; needs matplotlib).
"""
from __future__ import annotations

import argparse
import base64
import csv
import json
import mimetypes
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from ..policies import POLICY_NAMES
from .milebench import Sample, list_tasks, load_task, scorer_for


@dataclass(frozen=True)
class Setting:
    policy: str
    budget: float | None  # None: the server's own budget (or no eviction for "none")

    @property
    def xargs(self) -> dict:
        args = {"kv_eviction": self.policy}
        if self.budget is not None and self.policy != "none":
            args["kv_eviction_budget"] = self.budget
        return args

    @property
    def label(self) -> str:
        return "full cache" if self.policy == "none" else f"{self.policy}@{self.budget}"


def settings(policies: list[str], budgets: list[float]) -> list[Setting]:
    out = [Setting("none", None)] if "none" in policies else []
    out += [Setting(p, b) for p in policies if p != "none" for b in budgets]
    return out


def image_part(path: Path) -> dict:
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    data = base64.b64encode(path.read_bytes()).decode()
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}


def messages(sample: Sample) -> list[dict]:
    content = [{"type": "text", "text": value} if kind == "text" else image_part(value)
               for kind, value in sample.parts()]
    return [{"role": "user", "content": content}]


def ask(client, model: str, sample: Sample, setting: Setting, max_tokens: int) -> dict:
    """One request; a request the server rejects (e.g. too long) scores 0 and keeps its error."""
    import openai

    started = time.perf_counter()
    row = dict(task=sample.task, sample_id=sample.sample_id, policy=setting.policy, budget=setting.budget,
               answer=sample.answer)
    try:
        reply = client.chat.completions.create(model=model, messages=messages(sample), max_tokens=max_tokens,
                                               temperature=0, extra_body={"vllm_xargs": setting.xargs})
    except openai.APIStatusError as exc:
        return dict(row, prediction="", score=0.0, error=f"HTTP {exc.status_code}: {exc.message}",
                    latency_s=time.perf_counter() - started)
    prediction = reply.choices[0].message.content or ""
    return dict(row, prediction=prediction, score=scorer_for(sample)(prediction, sample.answer, sample.choices),
                prompt_tokens=reply.usage.prompt_tokens if reply.usage else None,
                latency_s=time.perf_counter() - started)


class Progress:
    """tqdm when installed, else a one-line counter on stderr."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="madakv-eval", unit="sample")
        except ImportError:
            self.bar, self.done, self.total = None, 0, total
        self.lock = threading.Lock()

    def update(self):
        with self.lock:
            if self.bar is not None:
                self.bar.update(1)
            else:
                self.done += 1
                print(f"\rmadakv-eval {self.done}/{self.total}", end="\n" if self.done == self.total else "",
                      file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def summarize(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[float]] = defaultdict(list)
    for row in rows:
        groups[(row["policy"], row["budget"], row["task"])].append(row["score"])
        groups[(row["policy"], row["budget"], "ALL")].append(row["score"])
    return [dict(policy=p, budget="" if b is None else b, task=t, samples=len(s), score=sum(s) / len(s))
            for (p, b, t), s in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0, kv[0][2]))]


def plot(summary: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    overall = [r for r in summary if r["task"] == "ALL"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy in sorted({r["policy"] for r in overall} - {"none"}):
        pts = sorted((r["budget"], r["score"]) for r in overall if r["policy"] == policy)
        ax.plot(*zip(*pts), marker="o", label=policy)
    for r in overall:
        if r["policy"] == "none":
            ax.axhline(r["score"], color="gray", linestyle="--", label="full cache")
    ax.set(xscale="log", xlabel="KV budget (ratio of the prompt)", ylabel="mean score", title="score vs budget")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="madakv-eval", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="root folder in MileBench layout (real or synthetic)")
    p.add_argument("--tasks", nargs="+", help="task folders to run (default: all)")
    p.add_argument("--limit", type=int, help="samples per task")
    p.add_argument("--endpoint", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", help="served model name (default: the endpoint's first model)")
    p.add_argument("--policies", nargs="+", default=["none", "madakv", "snapkv"], choices=POLICY_NAMES)
    p.add_argument("--budgets", nargs="+", type=float, default=[0.05, 0.1, 0.2, 0.5])
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--out", required=True, help="output folder")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import openai

    tasks = args.tasks or list_tasks(args.data)
    if not tasks:
        sys.exit(f"madakv-eval: no MileBench tasks under {args.data}")
    samples = [s for task in tasks for s in load_task(args.data, task, args.limit)]
    client = openai.OpenAI(base_url=args.endpoint, api_key="EMPTY")
    try:
        model = args.model or client.models.list().data[0].id
    except openai.APIConnectionError:
        sys.exit(f"madakv-eval: cannot reach {args.endpoint}; start `vllm serve MODEL --kv-eviction madakv` first")
    jobs = [(s, setting) for setting in settings(args.policies, args.budgets) for s in samples]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, progress = [], Progress(len(jobs))
    with open(out / "samples.jsonl", "w") as jsonl, ThreadPoolExecutor(args.concurrency) as pool:
        futures = [pool.submit(ask, client, model, s, setting, args.max_tokens) for s, setting in jobs]
        for future in as_completed(futures):
            row = future.result()
            rows.append(row)
            jsonl.write(json.dumps(row) + "\n")
            progress.update()
    progress.close()
    failed = [r for r in rows if "error" in r]
    if failed:
        print(f"madakv-eval: {len(failed)} of {len(rows)} requests failed (scored 0), e.g. {failed[0]['error']}",
              file=sys.stderr)
    summary = summarize(rows)
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    for r in summary:
        if r["task"] == "ALL":
            print(f"{r['policy']:>12s} {str(r['budget']):>5s}  score {r['score']:.3f}  ({r['samples']} samples)")
    print(f"wrote {out / 'samples.jsonl'}, {out / 'summary.csv'}"
          + (f", {out / 'scores.png'}" if plot(summary, out / "scores.png") else " (no plot: matplotlib missing)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
