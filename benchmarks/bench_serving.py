"""Serving under KV-memory pressure: the same capped KV memory for every run, N concurrent
multi-image requests, stock (eviction off) vs each policy at one budget, in one engine.

    python benchmarks/bench_serving.py [--requests 8] [--blocks 48] [--budget 0.2] \
        [--policies madakv snapkv streamingllm] [--sweep 0.05 0.1 0.5] [--decode-tokens 256] \
        [--during-prefill 0.2 0.5] [--long-tokens 512 --decode-cap 128] [--chunk 512]

Model: the SmolLM2-LLaVA test model (built into benchmarks/.models/ when missing), bf16, block
size 128 (--block-size), prompts of ~2K tokens with 8 images, prefilled in chunks of `--chunk`
tokens (every row alike). Three scenarios: prefill-heavy (--max-tokens, 64 output tokens),
decode-heavy (--decode-tokens, 256) and long-output (--long-tokens, 512: stock, MadaKV, and
MadaKV with eviction during decode at `--decode-cap`). Per setting: output tok/s, requests/s,
peak running requests, TTFT p50/p95, decode ms/token, each as a ratio to stock from the same run,
and output tok/s as a ratio to a reference row, stock with 5x the KV pool in a second engine
(memory not binding): how close eviction comes to having the memory. MadaKV at the `--sweep`
budgets in the prefill-heavy scenario; MadaKV with eviction during prefill at the
`--during-prefill` budgets (and one-shot at the same budgets) in the first two. The prefix cache
is reset before every setting.
Writes benchmarks/results/serving.json (+ .png with matplotlib).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(llm, prompts, params) -> dict:
    from _stamp import drive

    result = drive(llm, prompts, params)
    done, wall = result["requests"], result["wall_s"]
    ttft = [r["ttft_s"] for r in done]
    decode = [(r["done_s"] - r["ttft_s"]) / max(1, r["tokens"] - 1) * 1000 for r in done]
    return dict(wall_s=wall, output_tok_s=sum(r["tokens"] for r in done) / wall, requests_s=len(done) / wall,
                peak_running=result["peak_running"], ttft_p50_s=percentile(ttft, 0.5),
                ttft_p95_s=percentile(ttft, 0.95), decode_ms_token=statistics.mean(decode))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--blocks", type=int, default=48, help="KV blocks for the whole engine")
    p.add_argument("--block-size", type=int, default=128, help="tokens per block")
    p.add_argument("--dtype", default="bfloat16", help="float32 on CPUs with AMX (eviction refuses their bf16 layout)")
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--policies", nargs="+", default=["madakv", "snapkv", "streamingllm"])
    p.add_argument("--sweep", type=float, nargs="*", default=[0.05, 0.1, 0.5], help="more MadaKV budgets")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens, prefill-heavy scenario")
    p.add_argument("--decode-tokens", type=int, default=256, help="output tokens, decode-heavy scenario (0: skip)")
    p.add_argument("--during-prefill", type=float, nargs="*", default=[0.2, 0.5],
                   help="MadaKV budgets with eviction during prefill (prefill- and decode-heavy)")
    p.add_argument("--long-tokens", type=int, default=512, help="output tokens, long-output scenario (0: skip)")
    p.add_argument("--decode-cap", type=int, default=128, help="eviction during decode in the long-output scenario")
    p.add_argument("--chunk", type=int, default=512, help="max_num_batched_tokens: the prefill chunk")
    p.add_argument("--out", default="serving", help="results name under benchmarks/results (a subset: a new name)")
    p.add_argument("--reference-pool", type=int, default=5, help="KV pool multiple of the stock reference row")
    args = p.parse_args()
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    from _stamp import PREFIX_CACHE_NOTE, in_process_vllm_env, smollm2_llava, stamp, write_results

    in_process_vllm_env()
    from PIL import Image
    from vllm import LLM, SamplingParams

    from madakv_vllm.vllm.requests import (
        CONFIG_KEY,
        XARG_BUDGET,
        XARG_DECODE_BUDGET,
        XARG_DURING_PREFILL,
        XARG_POLICY,
    )

    model = smollm2_llava()

    def engine(blocks: int):
        return LLM(model=str(model), dtype=args.dtype, enforce_eager=True, distributed_executor_backend="uni",
                   max_model_len=4096, max_num_seqs=args.requests, num_gpu_blocks_override=blocks,
                   block_size=args.block_size, max_num_batched_tokens=args.chunk,
                   limit_mm_per_prompt={"image": 8}, seed=0,
                   additional_config={CONFIG_KEY: {"policy": "madakv", "budget": args.budget}})

    colors = ["red", "green", "blue", "yellow", "purple", "orange", "gray", "white"]
    sentence = "The weather was mild and the market in the old town was busy all day. "
    prompts = []
    for i in range(args.requests):  # distinct from the first token on: no prefix-cache sharing
        text = f"<|im_start|>user\nRequest {i}. " + "".join(f"<image>Picture {k + 1} of set {i}. " + sentence * 14
                                                             for k in range(8))
        text += "Which picture was taken first?<|im_end|>\n<|im_start|>assistant\n"
        images = [Image.new("RGB", (56, 56), colors[(i + k) % len(colors)]).rotate(i) for k in range(8)]
        prompts.append({"prompt": text, "multi_modal_data": {"image": images}})
    scenarios = [("prefill-heavy", args.max_tokens)] + ([("decode-heavy", args.decode_tokens)]
                                                         if args.decode_tokens else []) \
        + ([("long-output", args.long_tokens)] if args.long_tokens else [])
    policies = [(f"{p} {args.budget:.0%}", {XARG_POLICY: p}) for p in args.policies]
    sweep = [(f"madakv {b:.0%}", {XARG_POLICY: "madakv", XARG_BUDGET: b})
             for b in sorted(args.sweep) if b != args.budget]
    one_shot = [(f"madakv {b:.0%}", {XARG_POLICY: "madakv", XARG_BUDGET: b})
                for b in sorted(args.during_prefill) if b != args.budget]  # the decode-heavy comparison
    during = [(f"madakv {b:.0%}, during prefill", {XARG_POLICY: "madakv", XARG_BUDGET: b, XARG_DURING_PREFILL: True})
              for b in sorted(args.during_prefill)]
    settings = {"prefill-heavy": [("stock", {XARG_POLICY: "none"})] + policies + sweep + during,
                "decode-heavy": [("stock", {XARG_POLICY: "none"})] + policies + one_shot + during,
                "long-output": [("stock", {XARG_POLICY: "none"}),
                                (f"madakv {args.budget:.0%}", {XARG_POLICY: "madakv"}),
                                (f"madakv {args.budget:.0%}, decode cap {args.decode_cap}",
                                 {XARG_POLICY: "madakv", XARG_DECODE_BUDGET: args.decode_cap})]}

    def measure(llm, label, scenario, max_tokens, xargs):
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, extra_args=xargs)
        row = dict(setting=label, scenario=scenario, max_tokens=max_tokens, **run(llm, prompts, params))
        print(f"{scenario:>13s} {label:>22s}: {row['output_tok_s']:6.1f} tok/s, {row['requests_s']:.3f} req/s, "
              f"peak running {row['peak_running']}, TTFT p50/p95 {row['ttft_p50_s']:.1f}/{row['ttft_p95_s']:.1f} s, "
              f"decode {row['decode_ms_token']:.1f} ms/token", flush=True)
        return row

    rows = []
    llm = engine(args.blocks)
    run(llm, prompts[:1], SamplingParams(max_tokens=2, extra_args={XARG_POLICY: "none"}))  # warm-up
    for scenario, max_tokens in scenarios:
        for label, xargs in settings[scenario]:
            rows.append(measure(llm, label, scenario, max_tokens, xargs))
    prompt_tokens = len(llm.llm_engine.tokenizer.encode(prompts[0]["prompt"])) if llm.llm_engine.tokenizer else None
    llm.llm_engine.engine_core.shutdown()
    del llm
    reference = engine(args.blocks * args.reference_pool)  # stock with the memory eviction saves
    run(reference, prompts[:1], SamplingParams(max_tokens=2, extra_args={XARG_POLICY: "none"}))  # warm-up
    for scenario, max_tokens in scenarios:
        rows.append(measure(reference, f"stock, {args.reference_pool}x KV pool", scenario, max_tokens,
                            {XARG_POLICY: "none"}))
    for scenario, _ in scenarios:
        in_scenario = [r for r in rows if r["scenario"] == scenario]
        stock, ref = in_scenario[0], in_scenario[-1]
        for row in in_scenario:
            for key in ("output_tok_s", "requests_s", "peak_running", "ttft_p50_s", "ttft_p95_s", "decode_ms_token"):
                row[f"{key}_vs_stock"] = row[key] / stock[key] if stock[key] else None
            row["output_tok_s_vs_big_pool"] = row["output_tok_s"] / ref["output_tok_s"]
    result = dict(stamp=stamp(), model=f"SmolLM2-LLaVA ({args.dtype})",
                  kv_blocks=args.blocks, block_size=args.block_size,
                  requests=args.requests, images_per_request=8, prompt_text_tokens=prompt_tokens,
                  max_tokens=args.max_tokens, decode_tokens=args.decode_tokens, long_tokens=args.long_tokens,
                  decode_cap=args.decode_cap, chunk=args.chunk, budget=args.budget, sweep=args.sweep,
                  reference_pool=args.reference_pool, prefix_cache=PREFIX_CACHE_NOTE, rows=rows)

    write_results(HERE / "results" / args.out, result, draw)


def draw(plt, result: dict, settings: tuple[str, ...] | None = None):
    """serving.png from serving.json (only the rows of `settings` when given: the README's
    summary): output tok/s, peak running requests and TTFT p95 per scenario and setting."""
    from _stamp import bar_panels

    order = {"prefill-heavy": 0, "decode-heavy": 1, "long-output": 2}
    rows = sorted((r for r in result["rows"] if settings is None or r["setting"] in settings),
                  key=lambda r: order.get(r["scenario"], 3))  # stable: the run's order inside a scenario
    labelled = [dict(r, setting=f"{r['setting']} ({r['scenario'].split('-')[0]})") for r in rows]
    palette = {"stock": "0.6", "madakv": "C1", "snapkv": "C2", "streamingllm": "C3"}
    colors = ["C0" if "pool" in r["setting"] else palette.get(r["setting"].split()[0].rstrip(","), "C4") for r in rows]
    return bar_panels(plt, labelled, [("output_tok_s", "output tok/s", "{:.1f}"),
                                      ("peak_running", "peak running requests", "{:d}"),
                                      ("ttft_p95_s", "TTFT p95 (s)", "{:.1f}")], width=24 if settings is None else 12,
                      colors=colors)


if __name__ == "__main__":
    main()
