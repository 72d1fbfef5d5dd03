"""`madakv-eval`: score policies x budgets on MileBench-layout tasks, either against an
OpenAI-compatible endpoint (a running `vllm serve MODEL --kv-eviction madakv ...`) or with an
in-process vLLM engine. One server or engine covers the whole sweep: each request picks its
policy and budget through `vllm_xargs` (the engine's `SamplingParams.extra_args`).

    madakv-eval --data DATA_ROOT --endpoint http://127.0.0.1:8000/v1 \\
        --policies none madakv snapkv --budgets 0.05 0.1 0.2 0.5 --out eval/run1
    madakv-eval --data DATA_ROOT --engine MODEL --engine-args '{"max_model_len": 8192}' --out eval/run2

Settings run one after the other (the samples of one setting concurrently), so the server's
eviction counters (`/metrics`, or the engine's own) say how much KV each setting kept. The
prefix cache is emptied before each setting (a server needs VLLM_SERVER_DEV_MODE=1 for that; the
summary's prefix_cache column says whether it was).
Backends live in backends.py, the summary and plot in report.py.
Writes OUT/samples.jsonl (one line per sample and setting), OUT/summary.csv (mean score per
policy, budget and task with its 95 % interval: Wilson for exact-match tasks, bootstrap for
ROUGE; measured KV kept and blocks freed per setting), OUT/accuracy.json (the same as rows of
{setting, policy, budget, task, score, n, ci_low, ci_high, kv_kept}) and OUT/scores.png (score
with intervals and KV kept vs budget per policy; needs matplotlib).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import threading
from pathlib import Path

from ..policies import POLICY_NAMES
from .backends import Endpoint, Engine, settings
from .milebench import list_tasks, load_task
from .report import memory_of, plot, results_rows, summarize


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
    p.add_argument("--resume", action="store_true",
                   help="keep the settings OUT already finished (samples.jsonl, memory.json) and run only the rest: "
                        "a long sweep stopped midway goes on where it stopped")
    args = p.parse_args(argv)
    if not isinstance(args.engine_args, dict):
        p.error("--engine-args must be a JSON object")
    return args


def _key(policy: str, budget: float | None) -> str:
    return f"{policy} {budget}"


def write_memory(out: Path, memory: dict) -> None:
    """What each finished setting kept (the server's counters), next to its samples, for --resume."""
    (out / "memory.json").write_text(json.dumps({_key(*k): v for k, v in memory.items()}, indent=1))


def finished_settings(out: Path, samples: list) -> tuple[list[dict], dict]:
    """The rows and counters of the settings an earlier run of OUT finished: every sample answered
    and its counters recorded (a setting's rows are written together, when it ends)."""
    if not (out / "memory.json").is_file() or not (out / "samples.jsonl").is_file():
        return [], {}
    recorded = json.loads((out / "memory.json").read_text())
    wanted = {(s.task, s.sample_id) for s in samples}
    by_setting = {}  # setting -> {sample: row}: a line repeated by an interrupted write counts once
    for line in (out / "samples.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the last line of a run killed while writing it
            continue
        by_setting.setdefault((row["policy"], row["budget"]), {})[(row["task"], row["sample_id"])] = row
    rows, memory = [], {}
    for key, done in by_setting.items():
        if _key(*key) in recorded and done.keys() >= wanted:
            rows += [done[sample] for sample in sorted(wanted)]
            memory[key] = recorded[_key(*key)]
    return rows, memory


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
    rows, memory = finished_settings(out, samples) if args.resume else ([], {})
    todo = [s for s in sweep if (s.policy, s.budget) not in memory]
    if args.resume:
        print(f"madakv-eval: resuming, {len(sweep) - len(todo)} of {len(sweep)} settings already done",
              file=sys.stderr)
    progress = Progress(len(todo) * len(samples))
    try:
        # what a resumed run kept, rewritten whole before anything runs (drops a setting whose counters
        # were never recorded); a run killed later must not leave the finished settings half-written
        kept = out / "samples.jsonl.tmp"
        kept.write_text("".join(json.dumps(row) + "\n" for row in rows))
        kept.replace(out / "samples.jsonl")
        with open(out / "samples.jsonl", "a") as jsonl:
            for setting in todo:
                # a later setting must not reuse an earlier one's cached prompt blocks
                reset = backend.reset_prefix_cache()
                before = backend.eviction_totals()
                done = backend.run(samples, setting, args.max_tokens, progress)
                memory[(setting.policy, setting.budget)] = dict(
                    memory_of(before, backend.eviction_totals(), done),
                    prefix_cache="reset" if reset else "not reset (start the server with VLLM_SERVER_DEV_MODE=1)")
                for row in done:
                    jsonl.write(json.dumps(row) + "\n")
                jsonl.flush()
                rows += done
                write_memory(out, memory)
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
    (out / "accuracy.json").write_text(json.dumps(results_rows(summary, "engine" if args.engine else "endpoint"),
                                                  indent=1))
    for r in summary:
        if r["task"] == "ALL":
            kept = f"  KV kept {r['kv_kept']:.3f}" if r["kv_kept"] != "" else ""
            print(f"{r['policy']:>12s} {str(r['budget']):>5s}  score {r['score']:.3f} "
                  f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]{kept}  ({r['samples']} samples)")
    print(f"wrote {out / 'samples.jsonl'}, {out / 'summary.csv'}, {out / 'accuracy.json'}"
          + (f", {out / 'scores.png'}" if plot(summary, out / "scores.png") else " (no plot: matplotlib missing)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
