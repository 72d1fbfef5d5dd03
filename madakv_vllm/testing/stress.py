"""A long randomized engine run: the reliability bar for the vLLM seam.

Requests mix every policy, budgets from one token to the whole prompt, windows, prompt lengths,
images, prefix-sharing pairs and max_tokens 1, under chunked prefill with a small token budget
and a tight KV pool; some are aborted at random steps, some preempted by force (as vLLM's own
reset_prefix_cache does). Afterwards the pool must be back where it started, no eviction state
may be left on the scheduler or the worker, and a sample of finished requests must equal their
solo reruns (except those that decoded with the full cache first: preempted after compaction, or
compacted late because the pool was short).

    python benchmarks/stress_engine.py --requests 2000     # the benchmark-style run
    tests/test_vllm_engine.py runs a short version.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from ..policies import POLICY_NAMES
from ..vllm.requests import (
    CONFIG_KEY,
    LAYER_GROUPS_KEY,
    SERVED_PREFILL_SCORES,
    XARG_BUDGET,
    XARG_DECODE_BUDGET,
    XARG_DURING_PREFILL,
    XARG_POLICY,
    XARG_PREFILL_SCORES,
    XARG_WINDOW,
)

IMAGE_PROMPT = "<|im_start|>user\n" + "<|vision_start|><|image_pad|><|vision_end|>picture of a cat " * 2
WORDS = ("red", "cat", "river", "house", "dog", "green", "tree")


@dataclass
class StressReport:
    requests: int = 0
    finished: int = 0
    aborted: int = 0
    rejected: int = 0  # refused at add_request (the server's HTTP 400)
    forced_preemptions: int = 0
    compactions: int = 0
    prefill_compactions: int = 0  # of those, between prefill chunks (eviction during prefill)
    probes: int = 0  # chunks that carried the question's window to score such a compaction
    decode_compactions: int = 0  # of those, after the prompt's (eviction during decode)
    decoded_with_full_cache: int = 0
    solo_compared: int = 0
    solo_equal: int = 0
    steps: int = 0
    seconds: float = 0.0
    leaks: list[str] = field(default_factory=list)

    def ok(self) -> bool:
        return not self.leaks and self.solo_equal == self.solo_compared


def engine_settings(block_size: int = 32, layer_groups: int = 1) -> dict:
    """vllm.LLM settings for the stress run: a tight pool (per KV-cache group), small prefill chunks."""
    return dict(dtype="float32", enforce_eager=True, distributed_executor_backend="uni", max_model_len=1536,
                max_num_seqs=12, max_num_batched_tokens=256, num_gpu_blocks_override=96 * layer_groups,
                block_size=block_size, limit_mm_per_prompt={"image": 2}, seed=0,
                additional_config={CONFIG_KEY: {"policy": "madakv", "budget": 0.2, "window": 16},
                                   LAYER_GROUPS_KEY: layer_groups})


def blocks_held_mismatches(scheduler) -> list[str]:
    """Compacted running requests whose blocks in some KV-cache group are not exactly those of
    that group's physical length (logical - evicted tokens of the group)."""
    problems = []
    for request in scheduler.running:
        for g, manager in enumerate(scheduler.evicting_managers):
            evicted = manager.evicted_tokens.get(request.request_id)
            if evicted is None:
                continue
            held = len(manager.block_ids(request.request_id))
            physical = request.num_computed_tokens - evicted
            expected = {-(-physical // manager.block_size)}
            target = scheduler.eviction_targets.get(request.request_id)
            if target is not None and target.probe and request.num_computed_tokens < target.prompt_len:
                # after a chunk that carried a probe: its scratch slots, until the compaction
                expected.add(-(-(physical + target.probe) // manager.block_size))
            if held not in expected:
                problems.append(f"{request.request_id} group {g}: {held} blocks for {expected}")
    return problems


def random_request(rng: random.Random, shared_prefix: list[int], images, mode_rng: random.Random | None = None,
                   decode_rng: random.Random | None = None):
    """(prompt, extra_args, max_tokens) of one random request; `mode_rng` (a stream of its own, so
    the requests stay those of earlier runs with the same seed) turns on eviction during prefill
    for 30 % of them (H2O and LOOK-M refuse it: an HTTP 400); `decode_rng` (another) eviction
    during decode for 30 %, with longer outputs (up to 200 tokens)."""
    xargs = {XARG_POLICY: rng.choice(POLICY_NAMES)}
    roll = rng.random()
    if roll < 0.15:
        xargs[XARG_BUDGET] = rng.choice([1, 2, rng.randint(3, 600)])  # token counts
    elif roll < 0.8:
        xargs[XARG_BUDGET] = rng.choice([0.01, 0.05, 0.1, 0.2, 0.5, 1.0, round(rng.random(), 3) or 0.5])
    if rng.random() < 0.4:
        xargs[XARG_WINDOW] = rng.choice([0, 1, 4, 16, 32, 64])
    kind = rng.random()
    if kind < 0.15:
        filler = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 300)))
        prompt = {"prompt": IMAGE_PROMPT + filler + "<|im_end|>\n<|im_start|>assistant\n",
                  "multi_modal_data": {"image": images}}
    else:
        length = rng.choice([1, 2, 3, rng.randint(4, 64)] + [rng.randint(64, 600), rng.randint(600, 1300)] * 2)
        ids = [rng.randrange(20, 400) for _ in range(length)]
        if kind < 0.35 and length > 500:  # pairs of requests sharing a 400-token prefix
            ids[:400] = shared_prefix
        prompt = {"prompt_token_ids": ids}
    max_tokens = rng.choice([1, 1, rng.randint(2, 8), rng.randint(8, 40)])
    if mode_rng is not None and mode_rng.random() < 0.3:
        xargs[XARG_DURING_PREFILL] = True
        xargs[XARG_PREFILL_SCORES] = mode_rng.choice(SERVED_PREFILL_SCORES)
    if decode_rng is not None and decode_rng.random() < 0.3:
        xargs[XARG_DECODE_BUDGET] = decode_rng.choice([1, 16, 64, 0.1, 0.5])
        max_tokens = decode_rng.randint(40, 200)
    return prompt, xargs, max_tokens


def scores_held_while_waiting(llm, scheduler) -> list[str]:
    """Requests back in the waiting queue (preempted) whose worker still holds their score
    buffer, which lives outside vLLM's memory budget (empty when the worker is out of reach)."""
    try:
        worker = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner.kv_eviction
    except AttributeError:
        return []
    waiting = {request.request_id for request in scheduler.waiting}
    return [f"{req_id}: scores kept while preempted" for req_id, state in worker.requests.items()
            if state.scores is not None and req_id in waiting]


def _worker_leftovers(llm):
    """Request ids the worker keeps eviction state for but vLLM's own runner has forgotten (the
    runner learns of finished requests with the next scheduled step, so its own live requests
    are the reference), or None when the worker is out of reach (not an in-process engine)."""
    try:
        runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
        return set(runner.kv_eviction.requests) - set(runner.requests)
    except AttributeError:
        return None


def run(llm, num_requests: int, seed: int = 0, in_flight: int = 16, solo_sample: int = 40,
        progress=None) -> StressReport:
    """Drive `num_requests` random requests through an in-process engine with eviction on."""
    from PIL import Image
    from vllm import SamplingParams
    from vllm.exceptions import VLLMClientError

    from ..vllm.protocol import plans_of, probes_of

    rng, mode_rng, decode_rng = random.Random(seed), random.Random(f"during prefill {seed}"), \
        random.Random(f"during decode {seed}")
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    free_at_start = pool.get_num_free_blocks()
    images = [Image.new("RGB", (56, 56), color) for color in ("red", "green")]
    shared_prefix = [rng.randrange(20, 400) for _ in range(400)]
    report, requests, outputs = StressReport(), {}, {}
    abort_at: dict[int, str] = {}
    full_cache_first: set[str] = set()
    schedule, preempt = scheduler.schedule, scheduler._preempt_request

    def schedule_and_note(*args, **kwargs):
        output = schedule(*args, **kwargs)
        report.probes += len(probes_of(output))
        for request_id, plan in plans_of(output).items():
            report.compactions += 1
            target = scheduler.eviction_targets.get(request_id)
            report.prefill_compactions += target is not None and plan.covered < target.prompt_len
            report.decode_compactions += target is not None and plan.covered > target.prompt_len
            if plan.computed > plan.covered:
                full_cache_first.add(request_id.rsplit("-", 1)[0])
        return output

    def preempt_and_note(request, *args, **kwargs):
        if request.request_id in scheduler.evicting_manager.evicted_tokens:
            full_cache_first.add(request.request_id.rsplit("-", 1)[0])
        return preempt(request, *args, **kwargs)

    def add(index: int) -> None:
        prompt, xargs, max_tokens = random_request(rng, shared_prefix, images, mode_rng, decode_rng)
        request_id = f"s{seed}-{index}"
        try:
            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, extra_args=xargs)
            engine.add_request(request_id, prompt, params)
        except (ValueError, VLLMClientError):  # e.g. a token budget below the window: the server's HTTP 400
            report.rejected += 1
            return
        requests[request_id] = (prompt, params)
        if rng.random() < 0.03:
            abort_at[report.steps + rng.randint(1, 12)] = request_id

    scheduler.schedule, scheduler._preempt_request = schedule_and_note, preempt_and_note
    scheduler._plan_compactions = noting_compactions_that_wait(scheduler, full_cache_first)
    started, added = time.perf_counter(), 0
    try:
        while added < num_requests or engine.has_unfinished_requests():
            while added < num_requests and len(requests) - len(outputs) - report.aborted < in_flight:
                add(added)
                added += 1
                if progress is not None:
                    progress.update(1)
            if not engine.has_unfinished_requests():
                continue
            for out in engine.step():
                if out.finished and out.request_id in requests:
                    outputs[out.request_id] = list(out.outputs[0].token_ids)
            report.steps += 1
            report.leaks += blocks_held_mismatches(scheduler) + scores_held_while_waiting(llm, scheduler)
            if (request_id := abort_at.pop(report.steps, None)) and request_id not in outputs:
                engine.abort_request([request_id])
                report.aborted += 1
                outputs.pop(request_id, None)
            if report.steps % 25 == 0 and scheduler.running:  # forced preemption
                request = scheduler.running.pop()
                scheduler._preempt_request(request, time.monotonic())
                report.forced_preemptions += 1
    finally:
        del scheduler.schedule, scheduler._preempt_request, scheduler._plan_compactions
    report.seconds = time.perf_counter() - started
    report.requests = len(requests) + report.rejected
    aborted_ids = {rid for rid in requests if rid not in outputs}
    report.aborted = len(aborted_ids)
    report.finished = len(outputs)
    report.decoded_with_full_cache = len(full_cache_first & set(outputs))
    _check_nothing_left(report, scheduler, pool, free_at_start, _worker_leftovers(llm))
    comparable = sorted(rid for rid in outputs if rid not in full_cache_first)
    for request_id in rng.sample(comparable, min(solo_sample, len(comparable))):
        prompt, params = requests[request_id]
        engine.add_request(request_id + "-solo", prompt, params)
        solo = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    solo = list(out.outputs[0].token_ids)
        report.solo_compared += 1
        report.solo_equal += solo == outputs[request_id]
        if solo != outputs[request_id]:
            differs = _differs(prompt, params, outputs[request_id], solo)
            report.leaks.append(f"{request_id}: solo rerun differs ({differs})")
    _check_nothing_left(report, scheduler, pool, free_at_start, _worker_leftovers(llm))
    return report


def noting_compactions_that_wait(scheduler, noted: set[str]):
    """`scheduler._plan_compactions` that also puts into `noted` (ids without vLLM's suffix) each
    request whose compaction was due but waited for blocks: it decodes on with the full cache
    meanwhile, so its continuation may differ from a solo run's."""
    plan_compactions = scheduler._plan_compactions

    def plan_and_note_waits():
        due = [request.request_id for request in scheduler.running if scheduler._compaction_due(request)]
        frees, plans = plan_compactions()
        noted.update(rid.rsplit("-", 1)[0] for rid in due if rid not in plans)
        return frees, plans
    return plan_and_note_waits


def _differs(prompt: dict, params, batched: list[int], solo: list[int] | None) -> str:
    """What a reader needs to rerun a differing request: its settings and where the two part."""
    solo = solo or []
    first = next((i for i, (a, b) in enumerate(zip(batched, solo)) if a != b), min(len(batched), len(solo)))
    size = (f"{len(prompt['prompt_token_ids'])} prompt tokens" if "prompt_token_ids" in prompt
            else f"{len(prompt['prompt'])} prompt chars, images")
    return (f"{params.extra_args}, {size}, max_tokens {params.max_tokens}; first differing output token "
            f"{first} of {len(batched)} / {len(solo)}")


def _check_nothing_left(report, scheduler, pool, free_at_start, worker_leftovers) -> None:
    if pool.get_num_free_blocks() != free_at_start:
        report.leaks.append(f"free blocks {pool.get_num_free_blocks()} != {free_at_start} at the start")
    for name in ("eviction_targets", "frees_after_step", "reported_kept"):
        if getattr(scheduler, name):
            report.leaks.append(f"scheduler.{name} not empty: {len(getattr(scheduler, name))}")
    for g, manager in enumerate(scheduler.evicting_managers):
        for name in ("evicted_tokens", "covered", "first_decode_point"):
            if getattr(manager, name):
                report.leaks.append(f"group {g} {name} not empty: {len(getattr(manager, name))}")
    if worker_leftovers:
        report.leaks.append(f"worker keeps eviction state of finished requests: {sorted(worker_leftovers)[:5]}")
