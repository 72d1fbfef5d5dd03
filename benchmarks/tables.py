"""The result tables and plots of README.md and docs/*.md, rendered from what the benchmark
commands wrote to benchmarks/results/ (stamped JSON):

    python benchmarks/tables.py              # refresh every marked table and redraw every plot
    python benchmarks/tables.py --readme     # the same (the older name)
    python benchmarks/tables.py --check      # change nothing; exit 1 naming what is stale
    python benchmarks/tables.py --print [NAME ...]   # print tables (all when no NAME is given)

Each table comes with the command that regenerates its numbers and the machine they ran on. In
README.md and docs/*.md a table sits between `<!-- table:NAME -->` and `<!-- /table:NAME -->`.
Each plot (PLOTS) is drawn from its JSON by the benchmark's own draw function, titled with the
JSON's stamp (machine, commit, date) and tagged with a "Description" naming the data and code it
was drawn from, which tests/test_readme.py compares with the committed PNGs.
"""
from __future__ import annotations

import functools
import importlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROOT = HERE.parent
README = ROOT / "README.md"
for path in (HERE, ROOT):  # the benchmarks' modules (their draw functions) and madakv_vllm
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def pages() -> list[Path]:
    """The pages whose marked tables this script keeps: README.md and every docs/*.md."""
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _where(result: dict) -> str:
    s = result["stamp"]
    return f"{s.get('gpu') or s['machine']}, torch {s['torch']}, commit {s['commit']}, {s['date'][:10]}"


def _markdown(caption: str, header: list[str], rows: list[list]) -> str:
    lines = [caption, "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def overhead(r: dict) -> str:
    return _markdown(
        f"`python benchmarks/bench_overhead.py` ({_where(r)}; {r['model']}, block size {r['block_size']}, "
        f"{r['policy']} at {r['budget']:.0%}, batch 1"
        + (f"; selection alone: the earlier defaults ({', '.join(f'`{k}: {v}`' for k, v in r['before'].items())}) "
           f"against today's, same run" if "before" in r else "") + "):",
        ["prompt tokens", "prefill", "scoring + compaction", "share of prefill", "blocks held",
         "decode ms/token, full → evicted"] + (["selection alone, before → default"] if "before" in r else []),
        [[row["n"], f"{row['prefill_s']:.2f} s", f"{row['eviction_s'] * 1000:.0f} ms",
          f"{row['eviction_share_of_prefill']:.1%}",
          f"{row['blocks_before']} → {row['blocks_before'] - row['blocks_freed']:.0f}",
          f"{row['decode_ms_full']:.1f} → {row['decode_ms_evicted']:.1f}"]
         + ([f"{row['select_ms_before']:.0f} → {row['select_ms_default']:.0f} ms"] if "before" in r else [])
         for row in r["rows"]])


def serving(r: dict) -> str:
    caption = (f"`python benchmarks/bench_serving.py` ({_where(r)}; {r['model']}, {r['kv_blocks']} KV blocks of "
               f"{r['block_size']} tokens, {r['requests']} concurrent requests with {r['images_per_request']} images; "
               f"prefill-heavy: {r['max_tokens']} output tokens, decode-heavy: {r.get('decode_tokens')}"
               + (f", long-output: {r['long_tokens']}" if r.get("long_tokens") else "")
               + (f"; prefill chunks of {r['chunk']} tokens" if r.get("chunk") else "") + "; the "
               f"last row of each scenario is stock with {r.get('reference_pool')}x the KV pool; prefix cache "
               f"{r.get('prefix_cache', 'not reset between settings')}):")
    return _markdown(
        caption,
        ["scenario", "setting", "output tok/s (vs stock, vs big pool)", "requests/s", "peak running",
         "TTFT p50 / p95", "decode ms/token (per request)"],
        [[row.get("scenario", "prefill-heavy"), row["setting"],
          f"{row['output_tok_s']:.1f} ({row['output_tok_s_vs_stock']:.2f}x, "
          f"{row.get('output_tok_s_vs_big_pool', float('nan')):.2f}x)",
          f"{row['requests_s']:.3f}", row["peak_running"], f"{row['ttft_p50_s']:.1f} / {row['ttft_p95_s']:.1f} s",
          f"{row['decode_ms_token']:.0f}"] for row in r["rows"]])


def video(r: dict) -> str:
    table = _markdown(
        f"`python benchmarks/bench_video.py` ({_where(r)}; {r['model']}, {r['kv_blocks']} KV blocks of "
        f"{r['block_size']} tokens, {r['requests']} concurrent requests, one {r['frames']}-frame "
        f"{r['frame_size']}px video each):",
        ["setting", "prompt tokens", "prompt KV blocks held", "peak running", "output tok/s"],
        [[row["setting"], row["prompt_tokens"],
          f"{row['prompt_blocks_held']:.1f} ({row['prompt_blocks_held_vs_stock']:.2f}x)", row["peak_running"],
          f"{row['output_tok_s']:.1f} ({row['output_tok_s_vs_stock']:.2f}x)"] for row in r["rows"]])
    return table + (f"\n\n({r['evs_skipped']}.)" if r.get("evs_skipped") else "")


def accuracy(_: dict | None = None) -> str | None:
    """The HF run's table with the vLLM run's rows (" (vLLM)") merged in; each folder's runs.md
    names the commands that wrote into it and their machines."""
    from run_accuracy import markdown_table

    runs = [(RESULTS / run, suffix) for run, suffix in (("accuracy", ""), ("accuracy-vllm", " (vLLM)"))
            if (RESULTS / run / "runs.md").is_file()]
    if not runs:
        return None
    captions = [(folder / "runs.md").read_text().strip() for folder, _ in runs]
    if len(runs) == 2:
        captions = [f"HF path:\n\n{captions[0]}", f"vLLM rows:\n\n{captions[1]}"]
    return ("\n\n".join(captions) + "\n\nScore with its 95 % interval:\n\n"
            + markdown_table(*((f / "summary.csv", sfx) for f, sfx in runs)).strip())


def accuracy_test(_: dict | None = None) -> str | None:
    """The test split served by vLLM (run_accuracy.py --seed 1, every budget resumed into one folder);
    the caption lists every run that wrote into the folder (its runs.md)."""
    from run_accuracy import markdown_table

    folder = RESULTS / "accuracy-vllm-test"
    if not (folder / "runs.md").is_file():
        return None
    caption = ("The runs that wrote into `benchmarks/results/accuracy-vllm-test/`, each resuming the "
               "settings already there (score with its 95 % interval):\n\n" + (folder / "runs.md").read_text())
    hf_runs = folder.with_name("accuracy-test") / "runs.md"
    if hf_runs.is_file():  # the paired table's "(HF path)" rows
        caption += ("\nThe baselines vLLM did not serve, on the HF path (token-equal to vLLM, tested), same "
                    "samples, in `benchmarks/results/accuracy-test/` (its summary.csv has their scores per "
                    "task):\n\n" + hf_runs.read_text())
    return caption + "\n" + markdown_table((folder / "summary.csv", "")).strip() + "\n\n" + _paired_test(folder)


def _sample_scores(samples: Path) -> dict[tuple, dict]:
    """{(policy, budget): {(task, sample id): score}} of an accuracy run's samples file."""
    scores = {}
    if samples.is_file():
        for line in samples.read_text().splitlines():
            r = json.loads(line)
            scores.setdefault((r["policy"], r["budget"]), {})[(r["task"], r["sample_id"])] = r["score"]
    return scores


def _paired_test(folder: Path) -> str:
    """MadaKV against the full cache, SnapKV, the baselines run on the HF path (accuracy-test/) and its
    earlier defaults (the same samples in accuracy-vllm-test-spans/ and -window8/), per budget, by
    exact McNemar tests."""
    from madakv_vllm.evaluation.report import paired_comparison

    scores = _sample_scores(folder / "samples.jsonl")
    hf = _sample_scores(folder.with_name("accuracy-test") / "samples.jsonl")  # baselines vLLM did not serve
    earlier = {label: _sample_scores(folder.with_name(folder.name + suffix) / "samples.jsonl")
               for suffix, label in (("-spans", "the default before (quotas rounded up to whole spans)"),
                                     ("-window8", "the default before that (window 8, quotas as they fall)"))}
    rows = []
    for budget in sorted(b for p, b in scores if p == "madakv"):
        madakv = scores[("madakv", budget)]
        others = [("full cache", scores.get(("none", None))), ("SnapKV", scores.get(("snapkv", budget)))]
        others += [(f"{policy} (HF path)", hf[(policy, b)]) for policy, b in sorted(hf, key=str)
                   if b == budget and policy not in ("madakv", "snapkv", "none")]
        for label, other in others + [(label, old.get(("madakv", budget))) for label, old in earlier.items()]:
            if not other or other.keys() != madakv.keys():
                continue
            difference, wins, losses, p = paired_comparison(madakv, other)
            rows.append([f"{budget:.0%}", label, f"{difference:+.3f}", f"{wins} / {losses}",
                         "< 0.001" if p < 0.001 else f"{p:.3f}"])
    return _markdown("MadaKV against each on the same samples: the difference of the means, the samples only "
                     "one of the two answered (MadaKV / the other) and the exact McNemar p (p < 0.05: "
                     "significant):", ["budget", "MadaKV against", "difference", "only MadaKV / only the other",
                                       "p"], rows)


def lengths(r: dict) -> str:
    order = ["1k", "2k", "4k", "8k"]
    names = sorted({row["length"] for row in r["rows"]}, key=lambda x: order.index(x) if x in order else 9)
    tokens = {row["length"]: row["tokens"] for row in r["rows"]}
    cell = {(row["task"], row["length"]): f"{row['score']:.2f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}], "
                                          f"n={row['n']}"
            for row in r["rows"]}
    minutes = round(sum(r["seconds"].values()) / 60)
    return _markdown(
        f"`python benchmarks/run_lengths.py` ({_where(r)}, {minutes} min; full cache, HF reference path; "
        "score with its Wilson 95 % interval and samples per task):",
        ["task"] + [f"{name} (~{tokens[name]} tokens)" for name in names],
        [[task] + [cell.get((task, name), "") for name in names]
         for task in sorted({row["task"] for row in r["rows"]})])


def ablation(r: dict) -> str:
    took = "tabled from its samples files" if r.get("seconds") is None else f"{r['seconds'] // 60} min"
    return f"`python benchmarks/run_ablation.py` ({_where(r)}, {took}):\n\n{r['markdown']}"


def layer_groups(r: dict) -> str:
    groups = sorted({row["groups"] for row in r["decode"]})
    batches = sorted({row["batch"] for row in r["decode"]})

    def decode(g, batch):
        (row,) = [row for row in r["decode"] if row["groups"] == g and row["batch"] == batch]
        return (f"{row['decode_ms_per_step']:.0f} ms ({row['vs_one_group']:.2f}x), host "
                f"{row['host_ms_per_step']:.1f} ms")

    def pressure(g, policy):
        (row,) = [row for row in r["pressure"] if row["groups"] == g and row["policy"] == policy]
        return f"{row['output_tok_s']:.1f} / {row['peak_running']} / {row['model_blocks_per_request']:.2f}"

    blocks_before = r["memory"][0]["blocks_before"] if r["memory"] else "?"
    return _markdown(
        f"`python benchmarks/bench_layer_groups.py` ({_where(r)}; {r['model']}, block size {r['block_size']}; "
        f"decode: SnapKV {r['budget']:.0%} on {r['prompt_tokens']}-token prompts, ms per step once all are "
        f"compacted, and its host part that grows with the groups (scheduling, input preparation, metadata "
        f"builds); under pressure: {r['pressure_requests']} requests of 2048 tokens ({blocks_before} blocks "
        f"each before eviction) at {r['budget']:.0%} in {r['pool_model_blocks']} model-wide blocks: output tok/s / "
        f"peak running / model-wide blocks per request after compaction; prefix cache {r['prefix_cache']}):",
        ["KV-cache groups"] + [f"decode, batch {b}" for b in batches] + ["MadaKV under pressure",
                                                                         "PyramidKV under pressure"],
        [[g] + [decode(g, b) for b in batches] + [pressure(g, "madakv"), pressure(g, "pyramidkv")] for g in groups])


def layer_buckets(r: dict) -> str:
    tasks = sorted({row["task"] for row in r["rows"]})
    settings = list(dict.fromkeys((row["policy"], row["budget"], row["layer_buckets"]) for row in r["rows"]))

    def cell(setting, task):
        (row,) = [x for x in r["rows"]
                  if (x["policy"], x["budget"], x["layer_buckets"]) == setting and x["task"] == task]
        return f"{row['score']:.2f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}]"

    def name(policy, budget, buckets):
        return "full cache" if policy == "none" else f"{policy} {budget:.0%}, {buckets} bucket{'s' * (buckets > 1)}"

    n = r["rows"][0]["n"]
    return _markdown(
        f"`python benchmarks/run_layer_buckets.py --samples {r['samples_per_task']}` ({_where(r)}, "
        f"{r['seconds'] // 60} min; {r['model']}; score [95 % interval], n = {n} per task):",
        ["setting"] + tasks, [[name(*setting)] + [cell(setting, task) for task in tasks] for setting in settings])


def _run_stamp(run: str) -> dict | None:
    """The stamp of an accuracy run folder (benchmarks/results/RUN/): machine, commit and date as
    its runs.md lines name them (run_accuracy.py writes one per run); a folder grown by several
    runs names the first and the last commit."""
    path = RESULTS / run / "runs.md"
    if not path.is_file():
        return None
    found = [m.groups() for line in path.read_text().splitlines()
             if (m := re.search(r", ([^,]+, \d+ cores), commit (\w+), (\d{4}-\d\d-\d\d)", line))]
    if not found:
        return None
    commits = list(dict.fromkeys(commit for _, commit, _ in found))
    machine, _, date = found[-1]
    commit = commits[0] if len(commits) == 1 else f"{commits[0]} to {commits[-1]} ({len(found)} runs)"
    return dict(machine=machine, commit=commit, commits=commits, date=date)


def _interval(row: dict) -> str:
    return f"{row['score']:.2f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}]"


def _summary_interval(row: dict, key: str) -> str:
    """A run_decode_fidelity summary value with its 95 % interval (`key`_ci)."""
    return f"{row[key]:.2f} [{row[f'{key}_ci'][0]:.2f}, {row[f'{key}_ci'][1]:.2f}]"


BASELINES = ("snapkv", "pyramidkv", "lookm", "streamingllm", "h2o")
GLANCE_BUDGETS = (0.1, 0.2, 0.5)


def _glance_split(rows: list[dict]) -> str:
    """The split the glance shows: the test split once MadaKV has rows there, else the dev split."""
    return "test" if any(r.get("split") == "test" and r["policy"] == "madakv" for r in rows) else "dev"


def _glance_cells(rows: list[dict]) -> list[tuple[float, dict, dict, dict]]:
    """Per budget of GLANCE_BUDGETS: (budget, full cache, MadaKV, best baseline), means over the
    tasks of one split (`_glance_split`). MadaKV and the full cache as vLLM served them (the HF
    path's when vLLM has none), the baseline with the highest mean at that budget."""
    split = _glance_split(rows)
    mean = [r for r in rows if r["task"] == "ALL" and r.get("split", "dev") == split]

    def pick(policy, budget=None):
        for setting in ("endpoint", "hf"):
            for r in mean:
                if r["setting"] == setting and r["policy"] == policy and r["budget"] == budget:
                    return r
        return None

    full = pick("none")
    cells = []
    for budget in GLANCE_BUDGETS:
        baselines = [r for r in mean if r["policy"] in BASELINES and r["budget"] == budget]
        if full and pick("madakv", budget) and baselines:
            cells.append((budget, full, pick("madakv", budget), max(baselines, key=lambda r: r["score"])))
    return cells


def _glance_stamps() -> list[dict]:
    """The stamps of the runs the glance shows: those of its split (run_accuracy.py's run_dir)."""
    split = _glance_split(json.loads((RESULTS / "accuracy.json").read_text()))
    suffix = "-test" if split == "test" else ""
    return [dict(s, label=label) for run, label in ((f"accuracy-vllm{suffix}", "vLLM rows: "),
                                                    (f"accuracy{suffix}", "HF rows: "))
            if (s := _run_stamp(run))]


def accuracy_glance(rows: list) -> str | None:
    """README's accuracy summary: full cache, MadaKV and the best baseline at 10 / 20 / 50 %."""
    cells = _glance_cells(rows)
    if not cells:
        return None
    served = {m["setting"] for _, _, m, _ in cells} == {"endpoint"}
    n = cells[0][1]["n"]
    runs = "; ".join(f"{s['label']}{s['machine']}, commit{'s' if len(s['commits']) > 1 else ''} {s['commit']}, "
                     f"{s['date']}" for s in _glance_stamps())
    path = {"endpoint": "vLLM", "hf": "HF path"}
    return _markdown(
        f"`python benchmarks/run_accuracy.py` and `--hf` ({runs}): mean score of the SmolLM2-LLaVA judge over the "
        f"synthetic tasks ({_glance_split(rows)} split), n = {n} per cell, with its Wilson 95 % interval; MadaKV and "
        "the full cache "
        f"{'served by vLLM (`--kv-eviction madakv`, its defaults)' if served else 'on the HF path'}, the best "
        "baseline (highest mean of SnapKV, PyramidKV, LOOK-M, StreamingLLM at that budget; served by vLLM where "
        "it was, else from the HF path) on the same samples:",
        ["KV budget", "full cache", "MadaKV (vLLM)", "best baseline"],
        [[f"{budget:.0%}", _interval(full), _interval(madakv),
          f"{best['policy']} {_interval(best)} ({path.get(best['setting'], best['setting'])})"]
         for budget, full, madakv, best in cells])


def _glance_settings(r: dict) -> tuple[str, ...]:
    return ("stock", f"madakv {r['budget']:.0%}", f"stock, {r['reference_pool']}x KV pool")


def serving_glance(r: dict) -> str:
    """README's serving summary: stock, MadaKV and stock with the big pool, both scenarios."""
    rows = [row for row in r["rows"] if row["setting"] in _glance_settings(r)]
    return _markdown(
        f"`python benchmarks/bench_serving.py` ({_where(r)}; {r['model']}, {r['requests']} concurrent requests "
        f"with {r['images_per_request']} images, {r['kv_blocks']} KV blocks of {r['block_size']} tokens, the big "
        f"pool {r['reference_pool']}x that; prefill-heavy: {r['max_tokens']} output tokens, decode-heavy: "
        f"{r['decode_tokens']}; one run per setting, so no interval):",
        ["scenario", "setting", "output tok/s (vs stock)", "peak running", "TTFT p50 / p95"],
        [[row["scenario"], row["setting"], f"{row['output_tok_s']:.1f} ({row['output_tok_s_vs_stock']:.2f}x)",
          row["peak_running"], f"{row['ttft_p50_s']:.1f} / {row['ttft_p95_s']:.1f} s"]
         for row in sorted(rows, key=lambda row: row["scenario"] != "prefill-heavy")])


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _kernel_caption(r: dict) -> str:
    h = r["heads"]
    return (f"{r['dtype']}, {h['q']} query / {h['kv']} KV heads, head_dim {h['head_dim']}, window {r['window']}, "
            f"block size {r['block_size']}, {r['layout']} layout, one layer of one request, 20 % kept")


def kernels(r: dict) -> str:
    """The torch path of the kernels on the CPU that ran benchmarks/results/kernels.json."""
    return _markdown(
        f"`python benchmarks/bench_kernels.py` ({_where(r)}; {_kernel_caption(r)}):",
        ["tokens", "scoring, torch", "compaction, torch"],
        [[_tokens(row["n"]), f"{row['score_ms']:.1f} ms", f"{row['compact_ms']:.2f} ms"]
         for row in r["rows"] if row["impl"] == "torch"])


def kernels_h200(r: dict) -> str:
    """Both paths on a GPU: benchmarks/results/kernels_h200.json."""
    def cell(n, impl, key, pct=False):
        (row,) = [x for x in r["rows"] if x["n"] == n and x["impl"] == impl]
        ms = row[f"{key}_ms"]
        text = f"{ms:.3f} ms" if ms < 1 else f"{ms:.3g} ms"
        if pct and key == "score":
            text += f" ({row['score_pct_peak']:.1f} % of peak)"
        elif pct:
            text += (f" ({row['compact_pct_peak']:.0f} % of peak, "
                     f"{100 * row['compact_gbps'] / r['copy_gbps']:.0f} % of the copy)")
        return text

    lengths = sorted({row["n"] for row in r["rows"]})
    return _markdown(
        f"`bash scripts/device_check.sh`, which runs `python benchmarks/bench_kernels.py` ({_where(r)}, "
        f"{r['stamp']['machine']}, triton {r['stamp'].get('triton')}; datasheet HBM {r['peak_hbm_gbps']:.0f} GB/s, "
        f"a device-to-device copy measured {r['copy_gbps']:.0f} GB/s; {_kernel_caption(r)}; every time from "
        "`triton.testing.do_bench` with L2 flushed; % of peak counts one read of the keys for scoring, the kept "
        "keys and values read and written for compaction):",
        ["tokens", "scoring, Triton", "scoring, torch reference", "scoring, Triton with fp32 dots",
         "compaction of 20 %, Triton"],
        [[_tokens(n), cell(n, "triton", "score", True), cell(n, "torch", "score"), cell(n, "triton-fp32dot", "score"),
          cell(n, "triton", "compact", True)] for n in lengths])


def stress(r: dict) -> str:
    """The randomized engine run: benchmarks/results/stress.json."""
    e, rep, ev = r["engine"], r["report"], r["eviction"]
    return _markdown(
        f"`python benchmarks/stress_engine.py` ({_where(r)}, {rep['seconds']:.0f} s, {rep['steps']} engine steps; "
        f"tiny random Qwen2-VL ({e['dtype']}), {e['num_gpu_blocks_override']} KV blocks of {e['block_size']} tokens, "
        f"prefill chunks of {e['max_num_batched_tokens']} tokens, up to {e['max_num_seqs']} requests running, "
        f"engine default {ev['policy']} at {ev['budget']:.0%} with window {ev['window']}, each request's own "
        f"policy, budget and window drawn at random; seed {r['seed']}; verdict: {'pass' if r['ok'] else 'FAIL'}):",
        ["requests", "finished", "aborted", "refused (a server's HTTP 400)", "forced preemptions", "compactions",
         "solo reruns equal", "finished but not compared (decoded with the full cache first)", "leaks"],
        [[rep["requests"], rep["finished"], rep["aborted"], rep["rejected"], rep["forced_preemptions"],
          f"{rep['compactions']}" + (f" ({rep['prefill_compactions']} between prefill chunks"
                                     + (f", {rep['probes']} chunks carried a probe" if "probes" in rep else "")
                                     + (f"; {rep['decode_compactions']} during decode" if "decode_compactions" in rep
                                        else "") + ")"
                                     if "prefill_compactions" in rep else ""),
          f"{rep['solo_equal']} of {rep['solo_compared']}", rep["decoded_with_full_cache"],
          len(rep["leaks"]) or "none"]])


def prefill_memory(r: dict) -> str:
    """Peak blocks per request, one-shot vs during prefill: benchmarks/results/prefill_memory.json."""
    lengths = sorted({row["prompt"] for row in r["rows"]})
    settings = list(dict.fromkeys(row["setting"] for row in r["rows"]))
    cell = {(row["setting"], row["prompt"]): row for row in r["rows"]}
    c = r["capacity"]
    timed = any("slack" in setting for setting in settings)  # the slack sweep compares seconds too
    return _markdown(
        f"`python benchmarks/bench_prefill_memory.py` ({_where(r)}; {r['model']}, MadaKV {r['budget']:.0%}, prefill "
        f"chunks of {r['chunk']} tokens, blocks of {r['block_size']}; one request at a time, 8 output tokens; most "
        f"pool blocks in use at once, the compaction's copy included, and compactions made"
        + ("; \"during prefill\" has the default slack (0.5 of the kept count), the others the slack named, one "
           "engine each, with the request's seconds" if timed else "")
        + "). A "
        f"{c['prompt']}-token prompt in a pool of {c['pool_tokens']} tokens: "
        f"{'served' if c['served'] else 'NOT served'} with eviction during prefill at {c['budget']:.0%} "
        f"({c['compactions']} compactions, "
        f"peak {c['peak_blocks']} blocks, {c['seconds']:.0f} s); stock vLLM with that pool: \"{c['stock'][:160]}...\"",
        ["prompt tokens", *settings],
        [[_tokens(n), *(f"{cell[(s, n)]['peak_blocks']} blocks ({_count(cell[(s, n)]['compactions'], 'compaction')}"
                        f"{', ' + format(cell[(s, n)]['seconds'], '.1f') + ' s' if timed else ''})"
                        for s in settings)] for n in lengths])


def decode_memory(r: dict) -> str:
    """Blocks one request holds over a long output, per decode cap: benchmarks/results/decode_memory.json."""
    return _markdown(
        f"`python benchmarks/bench_decode_memory.py` ({_where(r)}; {r['model']}, MadaKV {r['budget']:.0%}, decode "
        f"slack {r['decode_slack']:.0%} of the cap, blocks of {r['block_size']}; one request at a time, a "
        f"{_tokens(r['prompt'])}-token prompt and {_tokens(r['output'])} output tokens; scoring + compaction seconds "
        f"of the decode compactions from the workers' counters)",
        ["setting", "most blocks while decoding", "blocks at the end", "peak (with the compaction's copy)",
         "compactions during decode", "ms per compaction", "share of the request's time", "output tok/s"],
        [[row["setting"], row["most_blocks_while_decoding"], row["last_blocks"], row["peak_blocks"],
          row["decode_compactions"], "" if row["ms_per_compaction"] is None else f"{row['ms_per_compaction']:.1f}",
          f"{row['overhead_share']:.1%}", row["tokens_per_second"]] for row in r["rows"]])


def decode_fidelity(r: dict) -> str:
    """Drift of a long output per decode cap on the judge: benchmarks/results/decode_fidelity.json."""
    return _markdown(
        f"`python benchmarks/run_decode_fidelity.py` ({_where(r)}; {r['model']}, {r['split']} split, "
        f"{r['policy']}; the first {r['tokens']} greedy tokens with the end token masked; 95 % bootstrap "
        f"intervals over prompts):",
        ["setting", "share equal to the full cache's", "first difference (median token)", "compactions", "n"],
        [[row["setting"], _summary_interval(row, "agreement"),
          row["first_difference_median"], row["decode_compactions"], row["n"]] for row in r["summary"]])


def decode_recall(r: dict) -> str:
    """Facts restated after a forced filler per decode cap: benchmarks/results/decode_recall.json."""
    return _markdown(
        f"`python benchmarks/run_decode_fidelity.py --probe recall` ({_where(r)}; {r['model']}, {r['split']} split, "
        f"{r['policy']}; {r['filler']} filler tokens forced through decode, then the full cache's own answer lead; "
        f"Wilson 95 % intervals, McNemar against the full cache):",
        ["setting", "fact restated", "p vs full cache", "compactions", "n"],
        [[row["setting"], _summary_interval(row, "recall"),
          "" if row["p_vs_full"] is None else f"{row['p_vs_full']:.3f}", row["decode_compactions"], row["n"]]
         for row in r["summary"]])


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


LEVER_ROUNDS = range(4, 10)  # the ablation rounds on MadaKV's levers in docs/evaluation.md, one table and plot each
TABLES = {"overhead": overhead, "serving": serving, "video": video, "accuracy": accuracy, "lengths": lengths,
          "accuracy_test": accuracy_test,
          "ablation": ablation, "levers": ablation, "layer_groups": layer_groups, "layer_buckets": layer_buckets,
          "accuracy_glance": accuracy_glance, "serving_glance": serving_glance, "kernels": kernels,
          "kernels_h200": kernels_h200, "stress": stress, "prefill_memory": prefill_memory,
          "decode_memory": decode_memory, "decode_fidelity": decode_fidelity,
          "decode_recall": decode_recall, "prefill_eviction": ablation, "prefill_appended": ablation,
          **{f"levers_round{n}": ablation for n in LEVER_ROUNDS}}
# the JSON each table is rendered from, when its name is not NAME.json (None: the table reads its own files)
TABLE_SOURCES = {"accuracy": None, "accuracy_test": None, "accuracy_glance": "accuracy", "serving_glance": "serving"}


def render(name: str) -> str:
    if name not in TABLES:
        sys.exit(f"tables.py: unknown table {name!r}; choose from {', '.join(TABLES)}")
    source = TABLE_SOURCES.get(name, name)
    result = _load(source) if source else None
    text = TABLES[name](result) if (result is not None or source is None) else None
    return text or f"(no results yet: run the {name} benchmark)"


MARKED = re.compile(r"<!-- table:(\w+) -->\n(?:(.*?)\n)?<!-- /table:\1 -->", re.S)  # an empty block: a new one


def marked_tables(path: Path) -> list[tuple[str, str]]:
    """(name, body) of every marked table on a page."""
    return [(match.group(1), match.group(2) or "") for match in MARKED.finditer(path.read_text())]


def refresh_tables(paths: list[Path] | None = None) -> dict[str, list[str]]:
    """Replace every marked table on the pages (default: README.md and docs/*.md) with its current
    rendering; returns the names found per page."""
    found = {}
    for path in paths or pages():
        names = []

        def replace(match):
            names.append(match.group(1))
            return f"<!-- table:{match.group(1)} -->\n{render(match.group(1))}\n<!-- /table:{match.group(1)} -->"

        text = path.read_text()
        new = MARKED.sub(replace, text)
        if new != text:
            path.write_text(new)
        if names:
            found[path.name] = names
    return found


def refresh_readme(path: Path = README) -> list[str]:
    """The README's marked tables only (kept for older callers)."""
    return refresh_tables([path]).get(path.name, [])


# --- plots ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plot:
    """A committed PNG, the JSON it is drawn from and the function that draws it."""
    source: str  # path of the JSON, relative to the repository root
    draw: Callable[[], Callable]  # returns draw(plt, result) (imported late: matplotlib only when drawing)
    stamp: Callable[[object], dict | list[dict]] = lambda result: result["stamp"]


def _module_draw(module: str, **keywords) -> Callable[[], Callable]:
    def get():
        import importlib

        draw = importlib.import_module(module).draw
        return functools.partial(draw, **keywords) if keywords else draw
    return get


def _scores_draw(kept: str) -> Callable[[], Callable]:
    def get():
        from madakv_vllm.evaluation.report import draw_scores

        return functools.partial(draw_scores, kept=kept)
    return get


def draw_accuracy_glance(plt, rows: list):
    """accuracy-glance.png from accuracy.json: the accuracy_glance table as bars with intervals."""
    cells = _glance_cells(rows)
    fig, ax = plt.subplots(figsize=(8, 4.8))
    width = 0.38
    full = cells[0][1]
    ax.axhspan(full["ci_low"], full["ci_high"], color="gray", alpha=0.15)
    ax.axhline(full["score"], color="gray", linestyle="--", label=f"full cache {_interval(full)}")
    for i, (budget, _, madakv, best) in enumerate(cells):
        served = best["setting"] == "endpoint"  # the baseline's own path: vLLM where it was served
        for offset, row, color, name in ((-width / 2, madakv, "C1", "MadaKV (vLLM)"),
                                         (width / 2, best, "C0" if served else "C9",
                                          f"best baseline ({'vLLM' if served else 'HF path'}), named on its bar")):
            bar = ax.bar(i + offset, row["score"], width, color=color,
                         yerr=[[row["score"] - row["ci_low"]], [row["ci_high"] - row["score"]]], capsize=3,
                         label=name if i == 0 or name not in ax.get_legend_handles_labels()[1] else None)
            ax.bar_label(bar, labels=[f"{row['score']:.2f}"], label_type="center", fontsize=8, color="white")
            if row["policy"] != "madakv":
                ax.text(i + offset, 0.02, row["policy"], ha="center", fontsize=7, color="white")
    ax.set_xticks(range(len(cells)), [f"{budget:.0%} of the KV" for budget, *_ in cells])
    ax.set(ylim=(0, 1.05), ylabel=f"mean score, n = {full['n']} (95 % interval)",
           title="accuracy at a glance: SmolLM2-LLaVA judge, synthetic suite")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1),
              ncol=2)  # below the axes: inside, it hid a bar's name
    return fig


PLOTS = {
    "benchmarks/results/overhead.png": Plot("benchmarks/results/overhead.json", _module_draw("bench_overhead")),
    "benchmarks/results/serving.png": Plot("benchmarks/results/serving.json", _module_draw("bench_serving")),
    "benchmarks/results/serving-glance.png": Plot(
        "benchmarks/results/serving.json",
        lambda: functools.partial(_module_draw("bench_serving")(),
                                  settings=_glance_settings(json.loads((RESULTS / "serving.json").read_text())))),
    "benchmarks/results/video.png": Plot("benchmarks/results/video.json", _module_draw("bench_video")),
    "benchmarks/results/layer_groups.png": Plot("benchmarks/results/layer_groups.json",
                                                _module_draw("bench_layer_groups")),
    "benchmarks/results/prefill_memory.png": Plot("benchmarks/results/prefill_memory.json",
                                                  _module_draw("bench_prefill_memory")),
    "benchmarks/results/decode_memory.png": Plot("benchmarks/results/decode_memory.json",
                                                 _module_draw("bench_decode_memory")),
    "benchmarks/results/decode_fidelity.png": Plot("benchmarks/results/decode_fidelity.json",
                                                   _module_draw("run_decode_fidelity")),
    "benchmarks/results/decode_recall.png": Plot(
        "benchmarks/results/decode_recall.json",
        lambda: importlib.import_module("run_decode_fidelity").draw_recall),
    "benchmarks/results/kernels_h200.png": Plot("benchmarks/results/kernels_h200.json", _module_draw("bench_kernels")),
    "benchmarks/results/lengths.png": Plot("benchmarks/results/lengths.json", _module_draw("run_lengths")),
    "benchmarks/results/ablation.png": Plot("benchmarks/results/ablation.json", _module_draw("run_ablation")),
    "benchmarks/results/levers.png": Plot("benchmarks/results/levers.json", _module_draw("run_ablation")),
    **{f"benchmarks/results/levers_round{n}.png": Plot(f"benchmarks/results/levers_round{n}.json",
                                                       _module_draw("run_ablation")) for n in LEVER_ROUNDS},
    **{f"benchmarks/results/{name}.png": Plot(f"benchmarks/results/{name}.json", _module_draw("run_ablation"))
       for name in ("prefill_eviction", "prefill_appended")},
    "benchmarks/results/accuracy-glance.png": Plot("benchmarks/results/accuracy.json",
                                                   lambda: draw_accuracy_glance, lambda _: _glance_stamps()),
    **{f"benchmarks/results/{run}/scores.png": Plot(
        f"benchmarks/results/{run}/accuracy.json", _scores_draw(kept),
        functools.partial(lambda _, run: _run_stamp(run), run=run))
       for run, kept in (("accuracy", "the policy's own kept share"), ("accuracy-vllm", "server counters"),
                         ("accuracy-vllm-window32", "server counters"))},
}


def _plot_inputs(png: str):
    plot = PLOTS[png]
    result = json.loads((ROOT / plot.source).read_text())
    return plot.draw(), result, plot.stamp(result)


def plot_description(png: str) -> str:
    """The "Description" the PNG must carry: drawn from its JSON as it is now, by today's code."""
    from _stamp import plot_description as describe

    draw, result, stamp = _plot_inputs(png)
    return describe(draw, ROOT / PLOTS[png].source, stamp)


def figure(png: str):
    """One of PLOTS as a matplotlib figure, titled with its stamp (not saved)."""
    from _stamp import make_figure

    draw, result, stamp = _plot_inputs(png)
    return make_figure(draw, result, stamp)


def draw_plot(png: str, out: Path | None = None) -> str:
    """Draw one of PLOTS from its JSON (to `out`, default: its committed place); returns its description."""
    from _stamp import save_plot

    draw, result, stamp = _plot_inputs(png)
    return save_plot(draw, result, out or ROOT / png, ROOT / PLOTS[png].source, stamp)


def embedded_plots() -> dict[str, list[str]]:
    """PNG (relative to the repository root) -> the pages that embed it, over README.md and docs/*.md."""
    found: dict[str, list[str]] = {}
    for page in pages():
        for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+\.png)\)", page.read_text()):
            png = (page.parent / target).resolve().relative_to(ROOT).as_posix()
            found.setdefault(png, []).append(page.relative_to(ROOT).as_posix())
    return found


def _png_description(path: Path) -> str | None:
    from PIL import Image

    with Image.open(path) as image:
        return image.text.get("Description")


def stale() -> list[str]:
    """What `python benchmarks/tables.py` would change: tables that differ from their rendering,
    tables no page shows, plots whose PNG was drawn from other data or code."""
    problems, shown = [], []
    for page in pages():
        for name, body in marked_tables(page):
            shown.append(name)
            if body != render(name):
                problems.append(f"{page.relative_to(ROOT)}: table {name} is stale")
    problems += [f"table {name} is on no page" for name in TABLES if name not in shown]
    problems += [f"table {name} is on {shown.count(name)} pages" for name in TABLES if shown.count(name) > 1]
    for png in PLOTS:
        if not (ROOT / png).is_file() or _png_description(ROOT / png) != plot_description(png):
            problems.append(f"{png} is stale")
    problems += [f"{png} (on {', '.join(on)}) has no JSON source in tables.PLOTS"
                 for png, on in embedded_plots().items() if png not in PLOTS]
    return problems


def main(argv=None) -> int:
    args = list(argv if argv is not None else sys.argv[1:])
    if args[:1] == ["--print"] or (args and not args[0].startswith("-")):
        for name in [a for a in args if a != "--print"] or list(TABLES):
            print(f"### {name}\n\n{render(name)}\n")
        return 0
    if args == ["--check"]:
        problems = stale()
        print("\n".join(problems) or "every table and plot is up to date")
        return 1 if problems else 0
    if args not in ([], ["--readme"]):
        sys.exit(__doc__)
    for page, names in refresh_tables().items():
        print(f"tables in {page}: {', '.join(names)}")
    for png in PLOTS:
        draw_plot(png)
        print(f"drew {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
