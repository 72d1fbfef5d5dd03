"""Regime B on this machine: what N KV-cache groups (buckets of layers) cost per decode step and
what they hold in memory, against one group (regime A).

    python benchmarks/bench_layer_groups.py [--groups 1 5 10 30] [--batches 8 32] [--prompt 1024]

Model: the random-weight Llama with SmolLM2-135M's shapes (30 layers, 3 KV heads) of
bench_overhead.py, fp32 (bf16 KV blocks are AMX tiles on Intel CPUs with AMX, which eviction
refuses). One engine per group count, started fresh, prefix caching off, one after another on
this machine.

- decode: `batch` requests of `--prompt` tokens with SnapKV 20 % (the same kept tokens in every
  layer, so only the grouping differs), ms per decode step from the step after the last
  compaction to the end (32 tokens).
- memory: 4 requests of 2048 tokens per policy (MadaKV with HCC, PyramidKV) at 20 %: the blocks
  each request holds right after compaction, in model-wide blocks (group blocks x layers in the
  group / all layers), so one and N groups compare in bytes.
Writes benchmarks/results/layer_groups.json (+ .png).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--groups", type=int, nargs="+", default=[1, 5, 10, 30])
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--budget", type=float, default=0.2)
    args = p.parse_args()
    sys.path.insert(0, str(HERE))
    from _stamp import in_process_vllm_env, stamp, write_results
    from bench_overhead import build_model

    in_process_vllm_env()
    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    from madakv_vllm.vllm.protocol import plans_of

    model = build_model(HERE / ".models" / "smollm2-shaped-random", 4096)
    num_layers = 30
    rows, memory = [], []
    for groups in tqdm(args.groups, desc="group counts", unit="engine"):
        llm = LLM(model=str(model), dtype="float32", enforce_eager=True, distributed_executor_backend="uni",
                  skip_tokenizer_init=True, enable_prefix_caching=False, max_model_len=4096,
                  max_num_seqs=max(args.batches), max_num_batched_tokens=8192, seed=0,
                  additional_config={"kv_eviction": {"policy": "snapkv", "budget": args.budget},
                                     "kv_eviction_layer_groups": groups})
        core = llm.llm_engine.engine_core.engine_core
        scheduler, engine = core.scheduler, llm.llm_engine
        block_size = scheduler.evicting_manager.block_size
        plans, schedule = [], scheduler.schedule

        def schedule_and_keep(*a, **k):
            output = schedule(*a, **k)
            plans.extend(plans_of(output).values())
            return output

        scheduler.schedule = schedule_and_keep

        def run(batch: int, length: int, max_tokens: int, **xargs) -> float:
            """ms per decode step once every request of the batch is compacted."""
            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=False,
                                    extra_args=xargs or None)
            for i in range(batch):
                ids = [(j * 7919 + i * 104729) % 40000 + 100 for j in range(length)]
                engine.add_request(f"g{groups}-{batch}-{len(plans)}-{i}", {"prompt_token_ids": ids}, params)
            plans_before, started, steps = len(plans), None, 0
            while engine.has_unfinished_requests():
                engine.step()
                if started is None and len(plans) - plans_before == batch:
                    started = time.perf_counter()  # every request compacted: pure decode from here
                elif started is not None:
                    steps += 1
            return 1000 * (time.perf_counter() - started) / max(1, steps)

        run(2, 256, 4)  # warm-up
        for batch in args.batches:
            ms = run(batch, args.prompt, args.decode_tokens + 2)
            rows.append(dict(groups=groups, batch=batch, decode_ms_per_step=ms))
            tqdm.write(f"groups {groups:2d} batch {batch:2d}: {ms:7.1f} ms per decode step")
        for policy in ("madakv", "pyramidkv"):
            first = len(plans)
            run(4, 2048, 2, kv_eviction=policy)
            for plan in plans[first:]:
                held = sum(len(ids) for ids in plan.block_ids) * (num_layers // groups) / num_layers
                memory.append(dict(groups=groups, policy=policy, model_blocks=held,
                                   blocks_before=-(-plan.prompt_len // block_size), kept_per_group=plan.kept))
            mean = sum(m["model_blocks"] for m in memory[-4:]) / 4
            tqdm.write(f"groups {groups:2d} {policy:9s}: {mean:.2f} model-wide blocks per request after compaction "
                       f"(kept per group {plans[-1].kept})")
        del scheduler.schedule
        llm.llm_engine.engine_core.shutdown()
        del llm
    base = {r["batch"]: r["decode_ms_per_step"] for r in rows if r["groups"] == 1}
    for r in rows:
        r["vs_one_group"] = r["decode_ms_per_step"] / base[r["batch"]] if r["batch"] in base else None
    result = dict(stamp=stamp(), prefix_cache="off (enable_prefix_caching=False)",
                  model="random Llama, SmolLM2-135M shapes (30 layers), fp32", budget=args.budget,
                  prompt_tokens=args.prompt, block_size=block_size, decode=rows, memory=memory)

    def draw(plt):
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        for batch in args.batches:
            pts = [r for r in rows if r["batch"] == batch]
            a.plot([r["groups"] for r in pts], [r["decode_ms_per_step"] for r in pts], "o-", label=f"batch {batch}")
        a.set(xlabel="KV-cache groups", ylabel="ms per decode step", title="decode (SnapKV 20 %)", xscale="log")
        a.legend()
        for policy in ("madakv", "pyramidkv"):
            pts = [(g, sum(m["model_blocks"] for m in memory if m["groups"] == g and m["policy"] == policy) / 4)
                   for g in args.groups]
            b.plot([g for g, _ in pts], [v for _, v in pts], "o-", label=policy)
        b.set(xlabel="KV-cache groups", ylabel="model-wide blocks per request", title="memory after compaction (20 %)",
              xscale="log")
        b.legend()
        return fig

    write_results(HERE / "results" / "layer_groups", result, draw)


if __name__ == "__main__":
    main()
