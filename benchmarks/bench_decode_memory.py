"""Eviction during decode on this machine: the KV blocks one request holds while it generates a
long output, without a cap and under caps of 64-512 tokens, and what the compactions cost.

    python benchmarks/bench_decode_memory.py [--prompt 1024] [--output 2000] [--caps 64 128 256 512]

Model: the random-weight Llama with SmolLM2-135M's shapes of bench_overhead.py, fp32, block size
32 (to see the steps), prefix caching off, MadaKV at `--budget` (the prompt is cut once, as
usual), decode slack 0.25 of the cap. One engine; one request at a time, each setting per
request (`vllm_xargs`), in this order: eviction off, the prompt only, then each cap. After every
step: the blocks the request holds (its block table; while a compaction runs its old blocks are
held a step longer, counted in "peak"). Overhead: the workers' scoring + compaction seconds of
the decode compactions (counters), per compaction and as a share of the request's wall time.
Writes benchmarks/results/decode_memory.json (+ .png).
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BLOCK = 32


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--output", type=int, default=2000)
    p.add_argument("--caps", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--budget", type=float, default=0.2)
    args = p.parse_args()
    sys.path.insert(0, str(HERE))
    from _stamp import in_process_vllm_env, stamp, write_results
    from bench_overhead import build_model

    in_process_vllm_env()
    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    from madakv_vllm.vllm.requests import CONFIG_KEY

    model = build_model(HERE / ".models" / "smollm2-shaped-random", args.prompt + args.output + 64)
    llm = LLM(model=str(model), dtype="float32", enforce_eager=True, distributed_executor_backend="uni",
              skip_tokenizer_init=True, enable_prefix_caching=False, max_model_len=args.prompt + args.output + 64,
              max_num_seqs=2, seed=0, block_size=BLOCK,
              additional_config={CONFIG_KEY: {"policy": "madakv", "budget": args.budget}})
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    worker = engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner.kv_eviction
    pool, manager = scheduler.kv_cache_manager.block_pool, scheduler.evicting_manager
    prompt = [random.Random(0).randrange(100, 40000) for _ in range(args.prompt)]
    settings = {"eviction off": {"kv_eviction": "none"}, f"prompt only ({args.budget:.0%})": {},
                **{f"cap {cap}": {"kv_eviction_decode_budget": cap} for cap in args.caps}}

    def run_one(xargs: dict) -> dict:
        free_at_start = pool.get_num_free_blocks()
        before = dict(worker.counters.values)
        engine.add_request("r", {"prompt_token_ids": prompt}, SamplingParams(
            temperature=0, max_tokens=args.output, ignore_eos=True, extra_args=xargs))
        trace, peak, started, tokens = [], 0, time.perf_counter(), None
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    tokens = list(out.outputs[0].token_ids)
            peak = max(peak, free_at_start - pool.get_num_free_blocks())
            for request in scheduler.running:
                trace.append((request.num_computed_tokens, len(manager.block_ids(request.request_id))))
        seconds = time.perf_counter() - started
        assert pool.get_num_free_blocks() == free_at_start, "blocks leaked"
        assert tokens is not None and len(tokens) == args.output
        counted = {k: worker.counters.values.get(k, 0.0) - before.get(k, 0.0)
                   for k in ("decode_compactions", "decode_seconds")}
        compactions = int(counted["decode_compactions"])
        decode = [held for computed, held in trace if computed > args.prompt]
        return dict(seconds=round(seconds, 2), tokens_per_second=round(args.output / seconds, 1),
                    peak_blocks=peak, most_blocks_while_decoding=max(decode), last_blocks=decode[-1],
                    decode_compactions=compactions,
                    ms_per_compaction=round(1000 * counted["decode_seconds"] / compactions, 2) if compactions else None,
                    overhead_share=round(counted["decode_seconds"] / seconds, 4),
                    trace=trace[::max(1, len(trace) // 400)])

    rows = []
    for setting, xargs in tqdm(settings.items(), desc="settings"):
        rows.append(dict(setting=setting, **run_one(xargs)))
        r = rows[-1]
        print(f"{setting:22s} blocks while decoding <= {r['most_blocks_while_decoding']:3d} (peak {r['peak_blocks']}),"
              f" {r['decode_compactions']} compactions, {r['ms_per_compaction']} ms each,"
              f" {r['overhead_share']:.1%} of {r['seconds']} s")
    llm.llm_engine.engine_core.shutdown()
    write_results(HERE / "results" / "decode_memory", dict(
        stamp=stamp(), model="random SmolLM2-135M-shaped Llama fp32 (30 layers, 3 KV heads)", prompt=args.prompt,
        output=args.output, budget=args.budget, decode_slack=0.25, block_size=BLOCK, rows=rows), draw)


def draw(plt, result: dict):
    """Blocks held against the tokens computed, per setting."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, row in enumerate(result["rows"]):
        computed, held = zip(*row["trace"])
        label = f"{row['setting']} (max {row['most_blocks_while_decoding']}, {row['tokens_per_second']} tok/s)"
        ax.plot(computed, held, color=f"C{i}", lw=1.2, label=label)
    ax.axvline(result["prompt"], color="grey", lw=0.8, ls=":")
    ax.set(xlabel="tokens computed (prompt, then output)", ylabel=f"KV blocks held ({result['block_size']} tokens)",
           title=f"One request: {result['prompt']}-token prompt, {result['output']} output tokens, "
                 f"MadaKV {result['budget']:.0%}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
