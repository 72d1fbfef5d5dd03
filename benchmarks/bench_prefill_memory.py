"""Eviction during prefill on this machine: the most KV blocks one request holds against its
prompt length, one-shot eviction against eviction during prefill, and a prompt larger than the
whole KV pool.

    python benchmarks/bench_prefill_memory.py [--lengths 1024 2048 4096 8192] [--chunk 256]

Model: the random-weight Llama with SmolLM2-135M's shapes of bench_overhead.py, fp32, block size
128, prefix caching off, MadaKV at `--budget` with its default slack. Every engine is started
fresh, one after another in this process.
- peak: one request at a time (8 output tokens) in an engine with room for the longest prompt;
  the peak is the most pool blocks in use at once during the request (the transient copy a
  compaction makes included), read after every step; "eviction off" for reference.
- slack: eviction during prefill again with each of `--slacks` (ratios of the kept count, one
  engine each): what a smaller slack saves in peak blocks and costs in compactions and time.
- capacity: an engine whose whole pool is a quarter of `--capacity-prompt` tokens serves that
  prompt with eviction during prefill at `--capacity-budget` (at 4x the pool, the kept tokens,
  the slack, a chunk and the compaction's copy must fit: about 7 % of the prompt or less); stock
  vLLM with the same pool and max_model_len refuses to start (its error is recorded).
Writes benchmarks/results/prefill_memory.json (+ .png).
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BLOCK = 128


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--chunk", type=int, default=256, help="max_num_batched_tokens: the prefill chunk")
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--slacks", type=float, nargs="*", default=[0.125, 0.25, 1.0],
                   help="prefill_slack values to compare with the default (one engine each)")
    p.add_argument("--capacity-prompt", type=int, default=8192)
    p.add_argument("--capacity-budget", type=float, default=0.05)
    args = p.parse_args()
    sys.path.insert(0, str(HERE))
    from _stamp import in_process_vllm_env, stamp, write_results
    from bench_overhead import build_model

    in_process_vllm_env()
    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    from madakv_vllm.vllm.protocol import plans_of
    from madakv_vllm.vllm.requests import CONFIG_KEY

    longest = max(max(args.lengths), args.capacity_prompt)
    model = build_model(HERE / ".models" / "smollm2-shaped-random", longest + 64)
    eviction = {"policy": "madakv", "budget": args.budget}
    rng = random.Random(0)
    prompts = {n: [rng.randrange(100, 40000) for _ in range(n)] for n in sorted({*args.lengths, args.capacity_prompt})}

    def engine(pool: int | None, max_len: int, config: dict | None):
        return LLM(model=str(model), dtype="float32", enforce_eager=True, distributed_executor_backend="uni",
                   skip_tokenizer_init=True, enable_prefix_caching=False, max_model_len=max_len, max_num_seqs=2,
                   max_num_batched_tokens=args.chunk, seed=0, block_size=BLOCK, num_gpu_blocks_override=pool,
                   additional_config={CONFIG_KEY: config} if config else {})

    def run_one(llm, prompt: list[int], xargs: dict) -> dict:
        """One request alone: its tokens, the most blocks in use at once, its compactions."""
        engine_ = llm.llm_engine
        scheduler = engine_.engine_core.engine_core.scheduler
        pool = scheduler.kv_cache_manager.block_pool
        free_at_start, least_free, compactions, tokens = pool.get_num_free_blocks(), None, 0, None
        engine_.add_request("r", {"prompt_token_ids": prompt},
                            SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, extra_args=xargs))
        schedule = scheduler.schedule

        def schedule_and_count(*a, **k):
            nonlocal compactions, least_free
            output = schedule(*a, **k)
            compactions += len(plans_of(output))
            free = pool.get_num_free_blocks()  # this step's blocks allocated, old ones not yet freed
            least_free = free if least_free is None else min(least_free, free)
            return output

        scheduler.schedule = schedule_and_count
        started = time.perf_counter()
        try:
            while engine_.has_unfinished_requests():
                for out in engine_.step():
                    if out.finished:
                        tokens = list(out.outputs[0].token_ids)
        finally:
            del scheduler.schedule
        assert pool.get_num_free_blocks() == free_at_start, "blocks leaked"
        return dict(peak_blocks=free_at_start - least_free, compactions=compactions, tokens=tokens,
                    seconds=round(time.perf_counter() - started, 2))

    rows = []
    llm = engine(None, longest + 64, eviction)
    settings = {"eviction off": {"kv_eviction": "none"}, "one-shot": {},
                "during prefill": {"kv_eviction_during_prefill": True},  # early chunks scored with a probe
                "during prefill, chunk scores": {"kv_eviction_during_prefill": True,
                                                 "kv_eviction_prefill_scores": "chunk"}}
    with tqdm(total=len(args.lengths) * len(settings), desc="peak blocks") as bar:
        for n in args.lengths:
            for setting, xargs in settings.items():
                result = run_one(llm, prompts[n], xargs)
                rows.append(dict(setting=setting, prompt=n, **{k: v for k, v in result.items() if k != "tokens"}))
                bar.update(1)
    llm.llm_engine.engine_core.shutdown()
    del llm
    for slack in tqdm(args.slacks, desc="slacks", unit="engine"):
        llm = engine(None, longest + 64, {**eviction, "prefill_slack": slack})
        for n in args.lengths:
            result = run_one(llm, prompts[n], {"kv_eviction_during_prefill": True})
            rows.append(dict(setting=f"during prefill, slack {slack:g}", prompt=n,
                             **{k: v for k, v in result.items() if k != "tokens"}))
        llm.llm_engine.engine_core.shutdown()
        del llm

    n = args.capacity_prompt
    pool = n // BLOCK // 4 + 1  # a quarter of the prompt, plus vLLM's null block
    capacity = dict(prompt=n, pool_blocks=pool, pool_tokens=(pool - 1) * BLOCK, chunk=args.chunk,
                    budget=args.capacity_budget)
    try:
        stock = engine(pool, n + 64, None)
        capacity["stock"] = "started (unexpected)"
        stock.llm_engine.engine_core.shutdown()
    except Exception as exc:  # noqa: BLE001 - vLLM's start-up check: recorded, it is the point
        capacity["stock"] = " ".join(str(exc).split())[:300]
    llm = engine(pool, n + 64, {**eviction, "budget": args.capacity_budget, "during_prefill": True})
    result = run_one(llm, prompts[n], {})
    capacity.update(served=result["tokens"] is not None and len(result["tokens"]) == 8, **result)
    llm.llm_engine.engine_core.shutdown()
    print(f"capacity: a {n}-token prompt in a pool of {capacity['pool_tokens']} tokens: served "
          f"{capacity['served']} with {result['compactions']} compactions, peak {result['peak_blocks']} of "
          f"{pool - 1} blocks; stock vLLM: {capacity['stock'][:120]}")
    write_results(HERE / "results" / "prefill_memory", dict(
        stamp=stamp(), model="random SmolLM2-135M-shaped Llama fp32 (30 layers, 3 KV heads)",
        budget=args.budget, chunk=args.chunk, block_size=BLOCK, rows=rows, capacity=capacity), draw)


def draw(plt, result: dict):
    """Peak blocks per request against the prompt length, per setting; the capacity run in a note."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, setting in enumerate(dict.fromkeys(r["setting"] for r in result["rows"])):
        rows = [r for r in result["rows"] if r["setting"] == setting]
        ax.plot([r["prompt"] for r in rows], [r["peak_blocks"] for r in rows], "o-", color=f"C{i}", label=setting)
        for r in rows:
            ax.annotate(str(r["peak_blocks"]), (r["prompt"], r["peak_blocks"]), textcoords="offset points",
                        xytext=(0, 5), ha="center", fontsize=7, color=f"C{i}")
    ax.set(xscale="log", xlabel="prompt tokens", ylabel=f"most KV blocks held at once ({result['block_size']} tokens)",
           title=f"MadaKV {result['budget']:.0%}, prefill chunk {result['chunk']}")
    ax.set_xticks([r["prompt"] for r in result["rows"] if r["setting"] == result["rows"][0]["setting"]])
    ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
    ax.legend(fontsize=8)
    c = result["capacity"]
    fig.text(0.01, 0.01, f"capacity: a {c['prompt']}-token prompt in a {c['pool_tokens']}-token pool: "
                         f"{'served' if c['served'] else 'not served'} during prefill at {c['budget']:.0%} "
                         f"({c['compactions']} compactions, "
                         f"peak {c['peak_blocks']} blocks); stock vLLM refuses to start", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


if __name__ == "__main__":
    main()
