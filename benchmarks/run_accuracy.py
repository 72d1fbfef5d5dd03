"""Accuracy vs KV budget on the synthetic MileBench-layout suite with the SmolLM2-LLaVA test
model, served by `vllm serve --kv-eviction` and scored by `madakv-eval`, in one command:

    python benchmarks/run_accuracy.py [--samples 100] [--policies none madakv snapkv ...] [--budgets 0.05 0.1 0.2 0.5]
    python benchmarks/run_accuracy.py --hf [...]   # the same sweep on the HF reference path

`--hf` prefills each sample once and decodes every setting from its own evicted copy of that
cache (`madakv_vllm.hf.generate_sweep`, token-equal to evicting alone): an order of magnitude
cheaper than vLLM's prefill per setting on a CPU, and layers may keep unequal counts there
(real PyramidKV and MadaKV's HCC; vLLM runs both with uniform layers). "KV kept" is then the
policy's own kept ratio.

Builds the judge (user cache) and the data (seed 0) when missing, starts the server (its prefix
cache emptied before every setting), runs the sweep, prints a markdown table and writes
benchmarks/results/accuracy-vllm/ (benchmarks/results/accuracy/ with --hf): samples.jsonl,
summary.csv, scores.png, runs.md (one line per run that wrote into the folder: command, machine,
commit). benchmarks/results/accuracy.json then holds the rows of both
runs (`setting` "endpoint": vLLM, "hf": the HF path). The vLLM table's "KV kept" column is what
the server's own counters measured for each setting (share of the prompt's KV left after eviction).
PyramidKV is left out by default: the server runs with one KV-cache group (vLLM's default here),
where it keeps uniform layers and is then SnapKV (`--hf`, or a server with
--kv-eviction-layer-groups, has the real PyramidKV).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=100, help="per task (default lengths: see synthetic.py)")
    # H2O and LOOK-M score with every prompt query (quadratic): minutes per 8K prompt on 2 CPU cores
    p.add_argument("--policies", nargs="+", default=["none", "madakv", "snapkv", "streamingllm"])
    p.add_argument("--budgets", nargs="+", default=["0.05", "0.1", "0.2", "0.5"])
    p.add_argument("--out", help="default: benchmarks/results/accuracy-vllm (accuracy with --hf)")
    p.add_argument("--dtype", default="bfloat16", help="float32 on CPUs with AMX (eviction refuses their bf16 layout)")
    p.add_argument("--hf", action="store_true", help="run on the HF reference path instead of vllm serve")
    p.add_argument("--max-tokens", type=int, default=20, help="the mixed task's answer has two facts")
    p.add_argument("--tasks", nargs="+", help="(--hf) only these tasks (e.g. to split a run over processes)")
    p.add_argument("--seed", type=int, default=0, help="suite seed: 0 the dev split (options are chosen on it, "
                                                       "the default), 1 the test split (never used to choose)")
    p.add_argument("--serve-flags", default="", metavar="FLAGS",
                   help="(vLLM) more `vllm serve` flags, e.g. \"--kv-eviction-during-prefill "
                        "--max-num-batched-tokens 136\"; use a fresh --out")
    p.add_argument("--kv-eviction-config", metavar="PRESET|FILE.yaml",
                   help="(vLLM) the server's --kv-eviction-config: policy options away from the defaults (each "
                        "request still names its policy and budget); use a fresh --out")
    p.add_argument("--resume", action="store_true", help="(vLLM) keep the settings OUT already finished and run "
                                                         "the rest (a sweep stopped midway)")
    p.add_argument("--summarize", type=int, metavar="MINUTES",
                   help="(--hf) only summarize OUT/samples.jsonl of a run that took MINUTES (stopped early, or "
                        "split over processes with --tasks and its samples files concatenated)")
    args = p.parse_args()
    args.out = args.out or str(RESULTS / run_dir(args.hf, args.seed))
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    from _stamp import smollm2_llava, synthetic_suite

    data = None if args.summarize else synthetic_suite(args.samples, seed=args.seed)

    started, where = time.time(), _machine()  # the commit that runs, not the one checked out at the end
    if args.summarize:
        summarize_samples(Path(args.out))
    elif args.hf:
        run_hf(args, data)
    else:
        run_vllm(args, smollm2_llava(), data)
    table = markdown_table(Path(args.out) / "summary.csv")
    took = (f"{args.summarize} min, tabled from its samples file" if args.summarize else
            f"{round((time.time() - started) / 60)} min")
    note = f"{'HF reference path' if args.hf else 'vllm serve, dtype ' + args.dtype}, {where}, {took}"
    command = " ".join(["python benchmarks/run_accuracy.py", *(a for a in sys.argv[1:] if a != "--summarize"
                                                                 and a != str(args.summarize))])
    # every run that wrote into OUT, one line each (the tables' captions and stamps read it): a
    # folder grown with --resume names all its runs
    runs = Path(args.out) / "runs.md"
    earlier = runs.read_text() if args.resume and runs.is_file() else ""
    runs.write_text(f"{earlier}- `{command}` ({note})\n")
    print(table)
    merge_results()
    redraw_plots(Path(args.out))


def redraw_plots(out: Path) -> None:
    """The committed plots drawn from this run (its scores.png, the README's summary), titled with
    the stamp runs.md now names; the tables follow with `python benchmarks/tables.py`."""
    from tables import PLOTS, ROOT, draw_plot

    sources = {(out.resolve() / "accuracy.json"), RESULTS / "accuracy.json"}
    for png, plot in PLOTS.items():
        if (ROOT / plot.source).resolve() in sources:
            draw_plot(png)
            print(f"drew {png}")


def run_dir(hf: bool, seed: int) -> str:
    """Where a run's files go: accuracy(-vllm) for the dev split, with -test for the test split."""
    from _stamp import DEV_SEED, TEST_SEED

    if seed not in (DEV_SEED, TEST_SEED):
        sys.exit(f"run_accuracy.py: --seed {seed} is neither the dev ({DEV_SEED}) nor the test ({TEST_SEED}) split")
    return ("accuracy" if hf else "accuracy-vllm") + ("-test" if seed == TEST_SEED else "")


def merge_results() -> None:
    """benchmarks/results/accuracy.json: the rows of the vLLM and the HF runs together, each with
    its split (dev: seed 0, test: seed 1)."""
    rows = [{**row, "split": "test" if run.endswith("-test") else "dev"}
            for run in (run_dir(hf, seed) for seed in (0, 1) for hf in (False, True))
            if (RESULTS / run / "accuracy.json").is_file()
            for row in json.loads((RESULTS / run / "accuracy.json").read_text())]
    (RESULTS / "accuracy.json").write_text(json.dumps(rows, indent=1))


def _machine() -> str:
    from _stamp import stamp

    s = stamp()
    return f"{s.get('gpu') or s['machine']}, commit {s['commit']}, {s['date'][:10]}"


def run_hf(args, data: Path) -> None:
    """The sweep on the HF reference path: the same files as madakv-eval writes."""
    from _stamp import hf_judge, hf_sweep, suite_samples
    from madakv_vllm.evaluation.backends import settings
    from madakv_vllm.policies import make_policy

    model, processor = hf_judge()
    sweep = settings(args.policies, [float(b) for b in args.budgets])
    policies = {s: make_policy(s.policy, **({} if s.budget is None else {"budget": s.budget})) for s in sweep}
    samples = suite_samples(data, args.tasks)
    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "samples.jsonl", "w") as jsonl:
        for sample, n, setting, prediction, score, report in hf_sweep(model, processor, samples, policies,
                                                                      args.max_tokens, "accuracy (HF)"):
            row = dict(task=sample.task, sample_id=sample.sample_id, policy=setting.policy, budget=setting.budget,
                       answer=sample.answer, prediction=prediction, prompt_tokens=n,
                       kv_kept=round(report.kept_ratio, 4), score=score)
            jsonl.write(json.dumps(row) + "\n")
            rows.append(row)
    write_summary(out, rows)


def summarize_samples(out: Path) -> None:
    """The summary of a run stopped early, from the samples it wrote."""
    write_summary(out, [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()])


def write_summary(out: Path, rows: list[dict]) -> None:
    from madakv_vllm.evaluation.report import plot, results_rows, summarize

    kept = defaultdict(list)
    for row in rows:
        if "kv_kept" in row:
            kept[(row["policy"], row["budget"])].append(row["kv_kept"])
    memory = {key: dict(kv_kept=round(sum(k) / len(k), 4), blocks_freed="", evicted_requests="",
                        prefix_cache="not used") for key, k in kept.items()}
    summary = summarize(rows, memory)
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    (out / "accuracy.json").write_text(json.dumps(results_rows(summary, "hf"), indent=1))
    plot(summary, out / "scores.png", kept="the policy's own kept share")


def run_vllm(args, model: Path, data: Path) -> None:
    from madakv_vllm.http_client import free_port, wait_ready

    port = free_port()
    vllm = Path(sys.executable).with_name("vllm")
    log = Path(args.out) / "server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # dev mode serves POST /reset_prefix_cache: madakv-eval empties the cache between settings
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "VLLM_SERVER_DEV_MODE": "1"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    # image limit: the noisy-pictures task sends six times the other tasks' pictures (24 at ~1K tokens);
    # 16 turned every one of its requests into an HTTP 400 scored 0
    server = subprocess.Popen([str(vllm), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
                               "--served-model-name", "smollm2-llava", "--dtype", args.dtype, "--max-model-len",
                               "8192", "--limit-mm-per-prompt", '{"image": 64}', "--kv-eviction", "madakv",
                               *(["--kv-eviction-config", args.kv_eviction_config] if args.kv_eviction_config else []),
                               *shlex.split(args.serve_flags)],
                              stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(f"http://127.0.0.1:{port}", server, log)
        subprocess.run([str(Path(sys.executable).with_name("madakv-eval")), "--data", str(data), "--endpoint",
                        f"http://127.0.0.1:{port}/v1", "--policies", *args.policies, "--budgets", *args.budgets,
                        "--concurrency", "2", "--max-tokens", str(args.max_tokens), "--out", args.out,
                        *(["--resume"] if args.resume else [])], check=True)
    finally:
        server.terminate()
        server.wait(timeout=60)


def markdown_table(*sources: Path | tuple[Path, str]) -> str:
    """Score per setting and task with its 95 % interval and n; "mean" is the mean over all samples.
    Each source is a summary.csv, or (summary.csv, suffix) whose settings get the suffix, e.g. the
    vLLM run's rows " (vLLM)" next to the HF run's."""
    cells, kept, order, n = defaultdict(dict), {}, {}, {}
    for source in sources:
        summary_csv, suffix = source if isinstance(source, tuple) else (source, "")
        with open(summary_csv) as f:
            for r in csv.DictReader(f):
                setting = ("full cache" if r["policy"] == "none"
                           else f"{r['policy']} {float(r['budget']):.0%}") + suffix
                cells[setting][r["task"]] = (f"{float(r['score']):.2f} [{float(r['ci_low']):.2f}, "
                                             f"{float(r['ci_high']):.2f}]")
                n[r["task"]] = r["samples"]
                order[setting] = (r["policy"] != "none", r["policy"], float(r["budget"] or 1), suffix)
                if r["task"] == "ALL" and r.get("kv_kept"):
                    kept[setting] = f"{float(r['kv_kept']):.1%}"
    tasks = sorted(set(n) - {"ALL"}) + ["ALL"]
    lines = ["| setting | " + " | ".join(("mean" if t == "ALL" else t) + f" (n={n[t]})" for t in tasks)
             + " | KV kept |", "|---" * (len(tasks) + 2) + "|"]
    for setting in sorted(cells, key=order.get):
        lines.append(f"| {setting} | " + " | ".join(cells[setting].get(t, "") for t in tasks)
                     + f" | {kept.get(setting, '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
