"""Eviction overhead and payoff in vLLM on this machine, per prompt length:
prefill time (eviction off), scoring + compaction time, blocks freed per request, and decode
ms/token with the full cache vs MadaKV at 20 %.

    python benchmarks/bench_overhead.py [--lengths 1024 2048 4096 8192 16384] [--decode-tokens 64]

Batch 1. Decode ms/token is measured from the second output token to the last, so the step that
compacts (the one making the second token) is not in it, for either run.

The same run then times the selection alone (`policy.select` over scores shaped like the model's:
30 layers x 3 KV heads x N, a picture of 16 tokens per 256), for MadaKV's defaults against the
settings it had before (`--before`, default: single tokens, `span: 1`): what a change of the
default adds to or takes from the scoring + compaction time above.

The model is a random-weight Llama with SmolLM2-135M's shapes (30 layers, 9 query / 3 KV heads,
head_dim 64, bf16), built once into benchmarks/.models/: real compute per token, meaningless
text. Writes benchmarks/results/overhead.json (+ .png with matplotlib).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build_model(path: Path, max_len: int) -> Path:
    config_file = path / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        if config["max_position_embeddings"] < max_len:  # random weights: only the limit changes
            config["max_position_embeddings"] = max_len
            config_file.write_text(json.dumps(config, indent=2))
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    print(f"building a random SmolLM2-135M-shaped Llama in {path}")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=max(max_len, 16384),
                         rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--before", default='{"span": 1}', help="MadaKV options of the earlier defaults (JSON), "
                                                           "whose selection time is compared with today's")
    args = p.parse_args()
    sys.path.insert(0, str(HERE))
    from _stamp import drive, in_process_vllm_env, stamp, write_results

    in_process_vllm_env()
    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    from madakv_vllm.vllm.requests import CONFIG_KEY

    max_len = max(args.lengths) + 256
    model = build_model(HERE / ".models" / "smollm2-shaped-random", max_len)
    llm = LLM(model=str(model), dtype="bfloat16", enforce_eager=True, distributed_executor_backend="uni",
              skip_tokenizer_init=True, enable_prefix_caching=False, max_model_len=max_len,
              max_num_seqs=1, seed=0,
              additional_config={CONFIG_KEY: {"policy": "madakv", "budget": args.budget}})
    core = llm.llm_engine.engine_core.engine_core
    scheduler = core.scheduler
    worker = core.model_executor.driver_worker.worker.model_runner.kv_eviction
    block_size = scheduler.evicting_manager.block_size

    def timed(ids, max_tokens, **xargs) -> tuple[float, float]:
        """(seconds to the first token, ms per token from the second on) for one request."""
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, extra_args=xargs or None,
                                detokenize=False)
        (req,) = drive(llm, [{"prompt_token_ids": ids}], params)["requests"]
        return req["ttft_s"], 1000 * (req["done_s"] - req["second_s"]) / max(1, req["tokens"] - 2)

    rows = []
    timed(list(range(100, 612)), 2)  # warm-up
    for n in tqdm(args.lengths, desc="lengths", unit="length"):
        ids = [(i * 7919) % 40000 + 100 for i in range(n)]
        prefill, decode_full = timed(ids, args.decode_tokens + 2, kv_eviction="none")
        freed_before = scheduler.eviction_counters.values["blocks_freed"]
        _, decode_evicted = timed(ids, args.decode_tokens + 2)
        overhead = worker.counters.seconds[-1]
        row = dict(n=n, prefill_s=prefill, eviction_s=overhead, eviction_share_of_prefill=overhead / prefill,
                   blocks_before=-(-n // block_size),
                   blocks_freed=scheduler.eviction_counters.values["blocks_freed"] - freed_before,
                   decode_ms_full=decode_full,
                   decode_ms_evicted=decode_evicted)
        tqdm.write(f"N={n:5d} prefill {prefill * 1000:8.1f} ms | scoring+compaction {overhead * 1000:7.1f} ms "
                   f"({100 * row['eviction_share_of_prefill']:.1f} % of prefill) | blocks {row['blocks_before']} -> "
                   f"{row['blocks_before'] - row['blocks_freed']:.0f} | decode {row['decode_ms_full']:.1f} -> "
                   f"{row['decode_ms_evicted']:.1f} ms/token")
        rows.append(row)
    before = json.loads(args.before)
    for row in tqdm(rows, desc="selection alone", unit="length"):
        row["select_ms_default"] = selection_ms(row["n"], args.budget, {})
        row["select_ms_before"] = selection_ms(row["n"], args.budget, before)
    result = dict(stamp=stamp(), prefix_cache="off (enable_prefix_caching=False)",
                  model="random Llama, SmolLM2-135M shapes, bf16", policy="madakv",
                  budget=args.budget, block_size=block_size, before=before, rows=rows)

    write_results(HERE / "results" / "overhead", result, draw)


def selection_ms(n: int, budget: float, options: dict, layers: int = 30, kv_heads: int = 3) -> float:
    """Median ms of MadaKV's `select` (uniform layers, as vLLM runs it) over random window scores."""
    import time

    import torch

    from madakv_vllm.policies import MadaKV

    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(layers, kv_heads, n, generator=generator) ** 8  # a few high scores, a long tail
    scores /= scores.sum(dim=-1, keepdim=True)
    tags = torch.zeros(n, dtype=torch.int8)
    for start in range(64, n - 16, 256):  # a picture of 16 tokens in every 256
        tags[start:start + 16] = 1
    policy = MadaKV(budget=budget, hcc=False, **options)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        policy.select(scores, tags)
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[2]


def draw(plt, result: dict):
    """overhead.png from overhead.json: prefill vs scoring + compaction, and decode speed, per
    prompt length (every value written next to its point)."""
    from _stamp import label_points

    rows = result["rows"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.3))
    lengths = [r["n"] for r in rows]
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{n // 1024}K" for n in lengths])
        ax.xaxis.set_minor_locator(plt.NullLocator())
    prefill, eviction = [r["prefill_s"] for r in rows], [r["eviction_s"] for r in rows]
    a.plot(lengths, prefill, "o-", label="prefill", color="C0")
    a.plot(lengths, eviction, "o-", label="scoring + compaction", color="C1")
    label_points(a, lengths, prefill, "{:.2f} s", "C0")
    label_points(a, lengths, eviction, "{:.0f} ms", "C1", offset=(0, -12), values=[e * 1000 for e in eviction])
    a.set(yscale="log", xlabel="prompt tokens", ylabel="seconds (log)", title="one request: prefill and eviction")
    a.margins(y=0.15)
    a.legend(fontsize=8)
    full, evicted = [r["decode_ms_full"] for r in rows], [r["decode_ms_evicted"] for r in rows]
    b.plot(lengths, full, "o-", label="full cache", color="C0")
    b.plot(lengths, evicted, "o-", label=f"{result['policy']} {result['budget']:.0%}", color="C1")
    label_points(b, lengths, full, "{:.1f}", "C0")
    label_points(b, lengths, evicted, "{:.1f}", "C1", offset=(0, -12))
    b.set(xlabel="prompt tokens", ylabel="ms / token", title="decode")
    b.margins(y=0.12)
    b.legend(fontsize=8)
    return fig

if __name__ == "__main__":
    main()
