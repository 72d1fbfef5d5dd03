"""Regime B on this machine: what N KV-cache groups (buckets of layers) cost per decode step and
what they hold in memory, against one group (regime A).

    python benchmarks/bench_layer_groups.py [--groups 1 5 30] [--batches 8 16] [--pool 48]

Model: the random-weight Llama with SmolLM2-135M's shapes (30 layers, 3 KV heads) of
bench_overhead.py, fp32 (bf16 KV blocks are AMX tiles on Intel CPUs with AMX, which eviction
refuses). One engine per group count, started fresh, prefix caching off, one after another on
this machine.

- decode: `batch` requests of `--prompt` tokens with SnapKV 20 % (the same kept tokens in every
  layer, so only the grouping differs), ms per decode step from the step after the last
  compaction to the end (32 tokens); the median of `--repeats` runs in the same engine. "host"
  is the part of a step spent in the work that grows with the group count (scheduling, the
  runner's input preparation and its per-group attention-metadata builds), timed around those
  calls: on a GPU it adds to the step's CPU time, not to the kernels.
- under KV pressure: 16 requests of 2048 tokens per policy (MadaKV with HCC, PyramidKV) at 20 %,
  32 output tokens each, in a pool of `--pool` model-wide blocks (the same bytes for every group
  count): output tokens/s, peak running requests, and the blocks each request holds right after
  compaction in model-wide blocks (group blocks x layers in the group / all layers), so one and
  N groups compare in bytes.
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
    p.add_argument("--groups", type=int, nargs="+", default=[1, 5, 30])
    p.add_argument("--batches", type=int, nargs="+", default=[8, 16])
    p.add_argument("--pool", type=int, default=48, help="KV pool in model-wide blocks of 128 tokens")
    p.add_argument("--pressure-requests", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="decode runs per batch size (the median is kept)")
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
    from madakv_vllm.vllm.requests import CONFIG_KEY, LAYER_GROUPS_KEY

    model = build_model(HERE / ".models" / "smollm2-shaped-random", 4096)
    num_layers = 30
    rows, memory, pressure = [], [], []

    class Engine:
        """One fresh engine: `groups` KV-cache groups, `pool` model-wide blocks (None: vLLM's)."""

        def __init__(self, groups: int, pool: int | None, max_seqs: int):
            self.groups = groups
            self.llm = LLM(model=str(model), dtype="float32", enforce_eager=True, distributed_executor_backend="uni",
                           skip_tokenizer_init=True, enable_prefix_caching=False, max_model_len=4096,
                           max_num_seqs=max_seqs, max_num_batched_tokens=8192, seed=0, block_size=128,
                           num_gpu_blocks_override=pool * groups if pool else None,
                           additional_config={CONFIG_KEY: {"policy": "snapkv", "budget": args.budget},
                                              LAYER_GROUPS_KEY: groups})
            self.engine = self.llm.llm_engine
            self.scheduler = self.engine.engine_core.engine_core.scheduler
            self.plans, schedule = [], self.scheduler.schedule

            def schedule_and_keep(*a, **k):
                output = schedule(*a, **k)
                self.plans.extend(plans_of(output).values())
                return output

            self.scheduler.schedule = schedule_and_keep
            # host work per step that grows with the group count: scheduling (per-group
            # allocation) and the runner's input preparation + per-group metadata builds
            runner = self.engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
            self.host_seconds = 0.0
            for owner, name in ((self.scheduler, "schedule"), (runner, "_prepare_inputs"),
                                (runner, "_build_attention_metadata")):
                setattr(owner, name, self._timed(getattr(owner, name)))
            self.run(2, 256, 4)  # warm-up

        def _timed(self, method):
            def timed(*a, **k):
                started = time.perf_counter()
                try:
                    return method(*a, **k)
                finally:
                    self.host_seconds += time.perf_counter() - started

            return timed

        def run(self, batch: int, length: int, max_tokens: int, **xargs) -> tuple[float, float, int, float]:
            """(ms per decode step once every request of the batch is compacted, seconds in all,
            peak running requests, host ms per decode step)."""
            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=False,
                                    extra_args=xargs or None)
            for i in range(batch):
                ids = [(j * 7919 + i * 104729) % 40000 + 100 for j in range(length)]
                self.engine.add_request(f"{batch}-{len(self.plans)}-{i}", {"prompt_token_ids": ids}, params)
            plans_before, first, started, steps, peak = len(self.plans), time.perf_counter(), None, 0, 0
            while self.engine.has_unfinished_requests():
                self.engine.step()
                peak = max(peak, len(self.scheduler.running))
                if started is None and len(self.plans) - plans_before == batch:
                    started = time.perf_counter()  # every request compacted: pure decode from here
                    host_before = self.host_seconds
                elif started is not None:
                    steps += 1
            if started is None:
                return float("nan"), time.perf_counter() - first, peak, float("nan")
            decode_ms = 1000 * (time.perf_counter() - started) / max(1, steps)
            return (decode_ms, time.perf_counter() - first, peak,
                    1000 * (self.host_seconds - host_before) / max(1, steps))

        def stop(self):
            self.engine.engine_core.shutdown()

    for groups in tqdm(args.groups, desc="group counts", unit="group count"):
        roomy = Engine(groups, None, max(args.batches))
        for batch in args.batches:
            runs = sorted(roomy.run(batch, args.prompt, args.decode_tokens + 2) for _ in range(args.repeats))
            ms, _, _, host = runs[len(runs) // 2]
            rows.append(dict(groups=groups, batch=batch, decode_ms_per_step=ms, host_ms_per_step=host,
                             runs_ms=[r[0] for r in runs], runs_host_ms=[r[3] for r in runs]))
            tqdm.write(f"groups {groups:2d} batch {batch:2d}: {ms:7.1f} ms per decode step, host {host:.2f} ms "
                       f"(median of {', '.join(f'{r[0]:.1f}' for r in runs)})")
        roomy.stop()
        tight = Engine(groups, args.pool, args.pressure_requests)
        block_size = tight.scheduler.evicting_manager.block_size
        for policy in ("madakv", "pyramidkv"):
            first = len(tight.plans)
            _, seconds, peak, _ = tight.run(args.pressure_requests, 2048, 32, kv_eviction=policy)
            held = []
            for plan in tight.plans[first:]:
                held.append(sum(len(ids) for ids in plan.block_ids) * (num_layers // groups) / num_layers)
                memory.append(dict(groups=groups, policy=policy, model_blocks=held[-1],
                                   blocks_before=-(-plan.covered // block_size), kept_per_group=plan.kept))
            pressure.append(dict(groups=groups, policy=policy, output_tok_s=32 * args.pressure_requests / seconds,
                                 peak_running=peak, model_blocks_per_request=sum(held) / max(1, len(held))))
            tqdm.write(f"groups {groups:2d} {policy:9s}: {pressure[-1]['output_tok_s']:.1f} tok/s, "
                       f"peak running {peak}, "
                       f"{pressure[-1]['model_blocks_per_request']:.2f} model-wide blocks per request after "
                       f"compaction (kept per group, last request: {tight.plans[-1].kept})")
        tight.stop()
    base = {r["batch"]: r["decode_ms_per_step"] for r in rows if r["groups"] == 1}
    for r in rows:
        r["vs_one_group"] = r["decode_ms_per_step"] / base[r["batch"]] if r["batch"] in base else None
    result = dict(stamp=stamp(), prefix_cache="off (enable_prefix_caching=False)",
                  model="random Llama, SmolLM2-135M shapes (30 layers), fp32", budget=args.budget,
                  prompt_tokens=args.prompt, block_size=block_size, pool_model_blocks=args.pool,
                  pressure_requests=args.pressure_requests, decode=rows, pressure=pressure, memory=memory)

    write_results(HERE / "results" / "layer_groups", result, draw)


def draw(plt, result: dict):
    """layer_groups.png from layer_groups.json: decode step time and memory per request after
    compaction vs the number of KV-cache groups."""
    from _stamp import label_points

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.3))
    groups = sorted({r["groups"] for r in result["decode"]})
    for i, batch in enumerate(sorted({r["batch"] for r in result["decode"]})):
        pts = sorted((r for r in result["decode"] if r["batch"] == batch), key=lambda r: r["groups"])
        xs, ys = [r["groups"] for r in pts], [r["decode_ms_per_step"] for r in pts]
        a.plot(xs, ys, "o-", label=f"batch {batch}", color=f"C{i}")
        label_points(a, xs, ys, "{:.0f} ms", f"C{i}", offset=(0, 7 if i else -13))
    a.set(xlabel="KV-cache groups", ylabel="ms per decode step",
          title=f"decode (SnapKV {result['budget']:.0%}, {result['prompt_tokens']}-token prompts)")
    a.margins(y=0.15)
    a.legend(fontsize=8)
    for i, policy in enumerate(("madakv", "pyramidkv")):
        pts = sorted((r for r in result["pressure"] if r["policy"] == policy), key=lambda r: r["groups"])
        xs, ys = [r["groups"] for r in pts], [r["model_blocks_per_request"] for r in pts]
        b.plot(xs, ys, "o-", label=policy, color=f"C{i}")
        label_points(b, xs, ys, "{:.2f}", f"C{i}", offset=(0, 7 if i else -13))
    b.set(xlabel="KV-cache groups", ylabel="model-wide blocks per request",
          title=f"memory after compaction ({result['budget']:.0%})")
    b.margins(y=0.15)
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.set_xscale("log")
        ax.set_xticks(groups, [str(g) for g in groups])
        ax.xaxis.set_minor_locator(plt.NullLocator())
    return fig


if __name__ == "__main__":
    main()
