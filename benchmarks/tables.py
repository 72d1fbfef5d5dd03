"""The README's result tables, rendered from what the benchmark commands wrote:

    python benchmarks/tables.py [NAME ...]   # print them (all when no NAME is given)
    python benchmarks/tables.py --readme     # refresh README.md

Each table comes with the command that regenerates its numbers and the machine they ran on.
In README.md a table sits between `<!-- table:NAME -->` and `<!-- /table:NAME -->`.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
README = RESULTS.parent.parent / "README.md"


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
        f"{r['policy']} at {r['budget']:.0%}, batch 1):",
        ["prompt tokens", "prefill", "scoring + compaction", "share of prefill", "blocks held",
         "decode ms/token, full → evicted"],
        [[row["n"], f"{row['prefill_s']:.2f} s", f"{row['eviction_s'] * 1000:.0f} ms",
          f"{row['eviction_share_of_prefill']:.1%}",
          f"{row['blocks_before']} → {row['blocks_before'] - row['blocks_freed']:.0f}",
          f"{row['decode_ms_full']:.1f} → {row['decode_ms_evicted']:.1f}"] for row in r["rows"]])


def serving(r: dict) -> str:
    caption = (f"`python benchmarks/bench_serving.py` ({_where(r)}; {r['model']}, {r['kv_blocks']} KV blocks of "
               f"{r['block_size']} tokens, {r['requests']} concurrent requests with {r['images_per_request']} images; "
               f"prefill-heavy: {r['max_tokens']} output tokens, decode-heavy: {r.get('decode_tokens')}; the "
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
    """The HF run's table with the vLLM run's rows (" (vLLM)") merged in; each run's first line
    names its command and machine."""
    from run_accuracy import markdown_table

    runs = [(RESULTS / run, suffix) for run, suffix in (("accuracy", ""), ("accuracy-vllm", " (vLLM)"))
            if (RESULTS / run / "table.md").is_file()]
    if not runs:
        return None
    captions = [(folder / "table.md").read_text().splitlines()[0] for folder, _ in runs]
    if len(runs) == 2:
        captions = [f"HF path: {captions[0]}", f"vLLM rows: {captions[1]}"]
    return "\n\n".join(captions) + "\n\n" + markdown_table(*((f / "summary.csv", sfx) for f, sfx in runs)).strip()


def lengths(r: dict) -> str:
    order = ["1k", "2k", "4k", "8k"]
    names = sorted({row["length"] for row in r["rows"]}, key=lambda x: order.index(x) if x in order else 9)
    tokens = {row["length"]: row["tokens"] for row in r["rows"]}
    cell = {(row["task"], row["length"]): f"{row['score']:.2f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}], n={row['n']}"
            for row in r["rows"]}
    minutes = round(sum(r["seconds"].values()) / 60)
    return _markdown(
        f"`python benchmarks/run_lengths.py` ({_where(r)}, {minutes} min; full cache, HF reference path; "
        "score with its Wilson 95 % interval and samples per task):",
        ["task"] + [f"{name} (~{tokens[name]} tokens)" for name in names],
        [[task] + [cell.get((task, name), "") for name in names] for task in sorted({row["task"] for row in r["rows"]})])


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
        (row,) = [x for x in r["rows"] if (x["policy"], x["budget"], x["layer_buckets"]) == setting and x["task"] == task]
        return f"{row['score']:.2f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}]"

    def name(policy, budget, buckets):
        return "full cache" if policy == "none" else f"{policy} {budget:.0%}, {buckets} bucket{'s' * (buckets > 1)}"

    n = r["rows"][0]["n"]
    return _markdown(
        f"`python benchmarks/run_layer_buckets.py --samples {r['samples_per_task']}` ({_where(r)}, "
        f"{r['seconds'] // 60} min; {r['model']}; score [95 % interval], n = {n} per task):",
        ["setting"] + tasks, [[name(*setting)] + [cell(setting, task) for task in tasks] for setting in settings])


TABLES = {"overhead": overhead, "serving": serving, "video": video, "accuracy": accuracy, "lengths": lengths,
          "ablation": ablation, "layer_groups": layer_groups, "layer_buckets": layer_buckets}


def render(name: str) -> str:
    if name not in TABLES:
        sys.exit(f"tables.py: unknown table {name!r}; choose from {', '.join(TABLES)}")
    result = None if name == "accuracy" else _load(name)
    text = TABLES[name](result) if (result is not None or name == "accuracy") else None
    return text or f"(no results yet: run the {name} benchmark)"


def refresh_readme(path: Path = README) -> list[str]:
    """Replace every marked table in the README with its current rendering; returns their names."""
    text, found = path.read_text(), []

    def replace(match):
        found.append(match.group(1))
        return f"<!-- table:{match.group(1)} -->\n{render(match.group(1))}\n<!-- /table:{match.group(1)} -->"

    path.write_text(re.sub(r"<!-- table:(\w+) -->.*?<!-- /table:\1 -->", replace, text, flags=re.S))
    return found


def main(argv=None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if args == ["--readme"]:
        print(f"refreshed in {README.name}: {', '.join(refresh_readme()) or 'no marked tables'}")
        return 0
    for name in args or list(TABLES):
        print(f"### {name}\n\n{render(name)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
