"""`madakv-eval`: score policies x budgets on MileBench-layout tasks, either against an
OpenAI-compatible endpoint (a running `vllm serve MODEL --kv-eviction madakv ...`) or with an
in-process vLLM engine. One server or engine covers the whole sweep: each request picks its
policy and budget through `vllm_xargs` (the engine's `SamplingParams.extra_args`).

    madakv-eval --data DATA_ROOT --endpoint http://127.0.0.1:8000/v1 \\
        --policies none madakv snapkv --budgets 0.05 0.1 0.2 0.5 --out eval/run1
    madakv-eval --data DATA_ROOT --engine MODEL --engine-args '{"max_model_len": 8192}' --out eval/run2

Settings run one after the other (the samples of one setting concurrently), so the server's
eviction counters (`/metrics`, or the engine's own) say how much KV each setting kept.
Writes OUT/samples.jsonl (one line per sample and setting), OUT/summary.csv (mean score per
policy, budget and task; measured KV kept and blocks freed per setting) and OUT/scores.png
(score and KV kept vs budget per policy; needs matplotlib).
"""
from __future__ import annotations

import argparse
import base64
import csv
import json
import mimetypes
import os
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


def _scored(row: dict, sample: Sample, prediction: str, prompt_tokens: int | None, started: float) -> dict:
    return dict(row, prediction=prediction, score=scorer_for(sample)(prediction, sample.answer, sample.choices),
                prompt_tokens=prompt_tokens, latency_s=time.perf_counter() - started)


def _row(sample: Sample, setting: Setting) -> dict:
    return dict(task=sample.task, sample_id=sample.sample_id, policy=setting.policy, budget=setting.budget,
                answer=sample.answer)


# Eviction counters as the server exports them (metrics.py), by our short names.
_METRICS = {"vllm:kv_eviction_requests_total": "requests", "vllm:kv_eviction_blocks_freed_total": "blocks_freed",
            "vllm:kv_eviction_tokens_kept_total": "kept", "vllm:kv_eviction_tokens_evicted_total": "evicted"}


def parse_eviction_metrics(text: str) -> dict[str, float]:
    """Sum our counters (over modalities) from a Prometheus text page."""
    totals: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in _METRICS:
            totals[_METRICS[name]] += float(line.rsplit(" ", 1)[1])
    return dict(totals)


class Endpoint:
    """An OpenAI-compatible server; a request it rejects (e.g. too long) scores 0 with its error."""

    def __init__(self, url: str, model: str | None, concurrency: int):
        import openai

        self.url, self.concurrency = url.rstrip("/"), concurrency
        self.client = openai.OpenAI(base_url=self.url, api_key="EMPTY")
        try:
            self.model = model or self.client.models.list().data[0].id
        except openai.APIConnectionError:
            sys.exit(f"madakv-eval: cannot reach {url}; start `vllm serve MODEL --kv-eviction madakv` first")

    def ask(self, sample: Sample, setting: Setting, max_tokens: int) -> dict:
        import openai

        started, row = time.perf_counter(), _row(sample, setting)
        try:
            reply = self.client.chat.completions.create(
                model=self.model, messages=messages(sample), max_tokens=max_tokens, temperature=0,
                extra_body={"vllm_xargs": setting.xargs})
        except openai.APIStatusError as exc:
            return dict(row, prediction="", score=0.0, error=f"HTTP {exc.status_code}: {exc.message}",
                        latency_s=time.perf_counter() - started)
        return _scored(row, sample, reply.choices[0].message.content or "",
                       reply.usage.prompt_tokens if reply.usage else None, started)

    def run(self, samples: list[Sample], setting: Setting, max_tokens: int, progress: "Progress") -> list[dict]:
        rows = []
        with ThreadPoolExecutor(self.concurrency) as pool:
            for future in as_completed([pool.submit(self.ask, s, setting, max_tokens) for s in samples]):
                rows.append(future.result())
                progress.update()
        return rows

    def eviction_totals(self) -> dict[str, float] | None:
        """The server's eviction counters ({} before its first stats tick, or when it is not our
        plugin), or None when it has no /metrics."""
        import urllib.error
        import urllib.request

        root = self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url
        for attempt in range(3):  # a busy server can be slow to answer
            try:
                with urllib.request.urlopen(f"{root}/metrics", timeout=60) as response:
                    return parse_eviction_metrics(response.read().decode())
            except urllib.error.HTTPError:
                return None  # it answers, but has no /metrics
            except OSError:
                time.sleep(1 + attempt)
        return None

    def close(self):
        pass


class Engine:
    """An in-process vLLM engine (`vllm.LLM`) with eviction on; requests pick their setting."""

    def __init__(self, model: str, engine_args: dict):
        from vllm import LLM
        from vllm.exceptions import VLLMClientError

        from ..vllm.metrics import ENV_DIR

        self.rejected = (ValueError, VLLMClientError)  # what the server would answer with a 4xx

        args = dict(engine_args)
        args.setdefault("additional_config", {}).setdefault("kv_eviction", {"policy": "madakv"})
        try:
            self.llm = LLM(model=model, **args)
        except (TypeError, ValueError) as exc:  # a bad --engine-args key or value
            sys.exit(f"madakv-eval: cannot start an engine on {model}: {' '.join(str(exc).split())}")
        self.metrics_dir = os.environ[ENV_DIR]  # the plugin made a fresh one for this engine

    def run(self, samples: list[Sample], setting: Setting, max_tokens: int, progress: "Progress") -> list[dict]:
        from vllm import SamplingParams

        started = time.perf_counter()
        params = SamplingParams(temperature=0, max_tokens=max_tokens, extra_args=setting.xargs)
        try:
            outputs = self.llm.chat([messages(s) for s in samples], params, use_tqdm=False)
        except self.rejected:  # a sample is rejected (e.g. too long): run them one by one
            if len(samples) == 1:
                raise
            return [row for s in samples for row in self._run_one(s, setting, max_tokens, progress)]
        rows = []
        for sample, out in zip(samples, outputs):
            rows.append(_scored(_row(sample, setting), sample, out.outputs[0].text, len(out.prompt_token_ids),
                                started))
            progress.update()
        return rows

    def _run_one(self, sample: Sample, setting: Setting, max_tokens: int, progress: "Progress") -> list[dict]:
        try:
            return self.run([sample], setting, max_tokens, progress)
        except self.rejected as exc:  # scored 0 with its error, as the endpoint does with an HTTP 400
            progress.update()
            return [dict(_row(sample, setting), prediction="", score=0.0, error=" ".join(str(exc).split()))]

    def eviction_totals(self) -> dict[str, float] | None:
        from ..vllm.metrics import read_totals

        values, _ = read_totals(self.metrics_dir)
        totals = defaultdict(float)
        for key, value in values.items():
            totals["kept" if key.startswith("kept_") else "evicted" if key.startswith("evicted_") else key] += value
        return dict(totals)

    def close(self):
        self.llm.llm_engine.engine_core.shutdown()


NOT_MEASURED = dict(kv_kept="", blocks_freed="", evicted_requests="")


def memory_of(before: dict | None, after: dict | None, rows: list[dict]) -> dict:
    """What one setting kept, from the counters' difference: share of the prompt KV kept by the
    requests that evicted, and blocks freed per request. Blank when the server exports no counters."""
    if not after:  # the counters appear at the server's first stats tick
        return NOT_MEASURED
    before = before or {}
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in _METRICS.values()}
    moved = delta["kept"] + delta["evicted"]
    return dict(kv_kept=round(delta["kept"] / moved, 4) if moved else 1.0,
                blocks_freed=round(delta["blocks_freed"] / max(1, len(rows)), 2),
                evicted_requests=int(delta["requests"]))


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


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="madakv-eval", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="root folder in MileBench layout (real or synthetic)")
    p.add_argument("--tasks", nargs="+", help="task folders to run (default: all)")
    p.add_argument("--limit", type=int, help="samples per task")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--endpoint", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    where.add_argument("--engine", metavar="MODEL", help="run an in-process vLLM engine on this model instead")
    p.add_argument("--engine-args", type=json.loads, default={}, metavar="JSON",
                   help='vllm.LLM keyword arguments for --engine, e.g. \'{"max_model_len": 8192}\'')
    p.add_argument("--model", help="served model name (default: the endpoint's first model)")
    p.add_argument("--policies", nargs="+", default=["none", "madakv", "snapkv"], choices=POLICY_NAMES)
    p.add_argument("--budgets", nargs="+", type=float, default=[0.05, 0.1, 0.2, 0.5])
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (endpoint)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)
    if not isinstance(args.engine_args, dict):
        p.error("--engine-args must be a JSON object")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    tasks = args.tasks or list_tasks(args.data)
    if not tasks:
        sys.exit(f"madakv-eval: no MileBench tasks under {args.data}")
    samples = [s for task in tasks for s in load_task(args.data, task, args.limit)]
    backend = Engine(args.engine, args.engine_args) if args.engine else \
        Endpoint(args.endpoint, args.model, args.concurrency)
    sweep = settings(args.policies, args.budgets)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, memory, progress = [], {}, Progress(len(sweep) * len(samples))
    try:
        with open(out / "samples.jsonl", "w") as jsonl:
            for setting in sweep:
                before = backend.eviction_totals()
                done = backend.run(samples, setting, args.max_tokens, progress)
                memory[(setting.policy, setting.budget)] = memory_of(before, backend.eviction_totals(), done)
                for row in done:
                    jsonl.write(json.dumps(row) + "\n")
                rows += done
    finally:
        progress.close()
        backend.close()
    failed = [r for r in rows if "error" in r]
    if failed:
        print(f"madakv-eval: {len(failed)} of {len(rows)} requests failed (scored 0), e.g. {failed[0]['error']}",
              file=sys.stderr)
    summary = summarize(rows, memory)
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    for r in summary:
        if r["task"] == "ALL":
            kept = f"  KV kept {r['kv_kept']:.3f}" if r["kv_kept"] != "" else ""
            print(f"{r['policy']:>12s} {str(r['budget']):>5s}  score {r['score']:.3f}{kept}  ({r['samples']} samples)")
    print(f"wrote {out / 'samples.jsonl'}, {out / 'summary.csv'}"
          + (f", {out / 'scores.png'}" if plot(summary, out / "scores.png") else " (no plot: matplotlib missing)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
