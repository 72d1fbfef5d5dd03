"""Engine-core side: vLLM's scheduler and KV-cache manager, made aware of evicted tokens.

Timeline of one request (step numbers are scheduler steps):
  s:   the prompt's last chunk is scheduled; the chunk holding the proxy window is never split
       (`_reserve_prefill_lookahead`), and prefix-cache hits stop before the scored queries.
  s+1: `schedule` swaps the request's blocks for fresh private ones sized for the kept tokens,
       records E = prompt_len - kept, and sends a CompactionPlan; the worker copies the kept
       tokens in before its forward. From now on block accounting uses physical lengths
       (logical - E); compacted blocks are never hashed.
       With several KV-cache groups (buckets of layers, `--kv-eviction-layer-groups`) all of
       this is per group, E_g = prompt_len - kept_g. When the kept counts depend on the scores
       (HCC, PyramidKV) the workers report them with the output of step s, so the swap happens
       in the first schedule() after that output came back (s+1, or s+2 with async scheduling).
  ack: when the output of step s+1 comes back, the old blocks are freed (prefix-cached ones
       stay cached, with their hashes, for other requests).
Preemption frees everything and resets E (re-prefill re-evicts); aborts free the plan's blocks
through the same paths.

Eviction during prefill (`during_prefill`): the same swap also follows a prefill chunk after
which the request holds more than kept + slack tokens per head (`EvictionTarget.limit`); it keeps
the prompt's kept count of the tokens computed so far (E grows with every such compaction, and
later chunks are allocated and attend by physical length), and the usual compaction still
follows the prompt's last chunk. With `prefill_scores: appended` the chunk a compaction follows
also carries a probe: `probe` more rows (its budget and slots counted as prompt tokens), which
the workers turn into the question's window; `schedule` then rewinds num_computed_tokens to the
chunk's end, and the probe's slots (never hashed) are overwritten by the next chunk or dropped
by the compaction.
"""
from __future__ import annotations

import logging

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

from .compat import check_parallel_and_runner, require_supported
from .metrics import Counters
from .protocol import CompactionPlan, attach_plans, attach_probes, plans_of, report_of
from .requests import (
    EvictionTarget,
    engine_config,
    eviction_target,
    layer_groups,
    max_score_bytes,
    prefill_chunk_tokens,
    request_policy,
)

logger = logging.getLogger("madakv_vllm")


def inside_multimodal_item(request, position: int) -> bool:
    """Whether a chunk ending at `position` would cut one of the request's images or videos."""
    return any(f.mm_position.offset < position < f.mm_position.offset + f.mm_position.length
               for f in request.mm_features or ())


class EvictingManager:
    """Wraps one KV-cache group's FullAttentionManager (in place, on the instance) so that a
    compacted request holds `logical - evicted` tokens: allocation counts physical tokens,
    compacted blocks are never hashed, freeing forgets the request."""

    def __init__(self, manager, probe_points: dict[str, int]):
        self.manager = manager
        self.evicted_tokens: dict[str, int] = {}
        self.covered: dict[str, int] = {}  # logical tokens the request's last compaction selected from
        self.first_decode_point: dict[str, int] = {}  # eviction during decode, once the prompt is compacted
        m, evicted, covered, first_decode = manager, self.evicted_tokens, self.covered, self.first_decode_point
        get_num_blocks_to_allocate, allocate_new_blocks = m.get_num_blocks_to_allocate, m.allocate_new_blocks
        cache_blocks, pop_blocks_for_free = m.cache_blocks, m.pop_blocks_for_free

        def physical_get_num_blocks_to_allocate(request_id, num_tokens, *args, **kwargs):
            return get_num_blocks_to_allocate(request_id, num_tokens - evicted.get(request_id, 0), *args, **kwargs)

        def physical_allocate_new_blocks(request_id, num_tokens, num_tokens_main_model):
            e = evicted.get(request_id, 0)
            return allocate_new_blocks(request_id, num_tokens - e, num_tokens_main_model - e)

        def cache_blocks_unless_compacted(request, num_tokens, *args, **kwargs):
            if request.request_id in evicted:  # compacted blocks no longer match their hashes
                return
            # a probe's rows hold the question's keys, not those of the prompt tokens at their positions
            cache_blocks(request, min(num_tokens, probe_points.get(request.request_id, num_tokens)), *args, **kwargs)

        def pop_blocks_for_free_and_forget(request_id):
            evicted.pop(request_id, None)
            covered.pop(request_id, None)
            first_decode.pop(request_id, None)
            return pop_blocks_for_free(request_id)

        m.get_num_blocks_to_allocate = physical_get_num_blocks_to_allocate
        m.allocate_new_blocks = physical_allocate_new_blocks
        m.cache_blocks = cache_blocks_unless_compacted
        m.pop_blocks_for_free = pop_blocks_for_free_and_forget

    @property
    def block_size(self) -> int:
        return self.manager.block_size

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.manager.req_to_blocks[request_id]]

    def swap_in_private_blocks(self, request_id: str, num_tokens: int, evicted: int, covered: int):
        """Give the request fresh blocks for num_tokens physical tokens; return its old blocks
        (the caller frees them once no in-flight step reads them). The caller checks the pool."""
        m = self.manager
        needed = -(-num_tokens // m.block_size)
        new_blocks = m.block_pool.get_new_blocks(needed)
        old_blocks = m.req_to_blocks[request_id]
        m.req_to_blocks[request_id] = new_blocks
        self.evicted_tokens[request_id] = evicted
        self.covered[request_id] = covered
        if m.records_new_block_ids:
            m.new_block_ids.extend(b.block_id for b in new_blocks)
        return old_blocks


class EvictingSchedulerMixin:
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        require_supported("vllm.v1.core.sched.scheduler", "vllm.v1.core.kv_cache_manager",
                          "vllm.v1.core.single_type_kv_cache_manager")
        self.eviction_config = engine_config(self.vllm_config.additional_config)
        check_parallel_and_runner(self.vllm_config)  # the engine core's final config, not the front end's
        managers = self.kv_cache_manager.coordinator.single_type_managers
        self.num_groups = layer_groups(self.vllm_config.additional_config)
        if len(managers) != self.num_groups or not all(isinstance(m, FullAttentionManager) for m in managers):
            raise RuntimeError(f"KV eviction needs {self.num_groups} full-attention KV-cache group(s); this model "
                               f"has {[type(m).__name__ for m in managers]}")
        groups = self.kv_cache_config.kv_cache_groups
        self.scores_per_token = sum(len(g.layer_names) for g in groups) * groups[0].kv_cache_spec.num_kv_heads
        self.score_bytes_limit = max_score_bytes(self.vllm_config.additional_config)  # the workers read the same
        self.prefill_chunk = prefill_chunk_tokens(self.vllm_config)  # the workers too
        self.probe_points: dict[str, int] = {}  # this schedule()'s probes: request -> the point they score
        self.evicting_managers = [EvictingManager(m, self.probe_points) for m in managers]
        manager = self.evicting_managers[0]  # compaction state is per group; the first one answers "compacted?"
        self.evicting_manager = manager
        # kept prompt tokens per group, as the workers reported them (targets with reported_counts)
        self.reported_kept: dict[str, list[int]] = {}
        self.eviction_targets: dict[str, EvictionTarget | None] = {}
        self.eviction_counters = Counters("scheduler")
        # old blocks of each step's plans, freed when that step's output comes back
        self.frees_after_step: dict[int, tuple[object, list]] = {}
        get_computed_blocks = self.kv_cache_manager.get_computed_blocks

        def get_computed_blocks_leaving_scored_queries(request):
            """Prefix hits stop before the first queries that score a compaction: they must be computed."""
            blocks, num_hit, boundary = get_computed_blocks(request)
            target = self.eviction_targets.get(request.request_id)
            if target is not None and num_hit > target.first_scored_query():
                limit = target.first_scored_query() // manager.block_size * manager.block_size
                blocks, num_hit = self.kv_cache_manager.truncate_computed_blocks(blocks, limit), limit
            return blocks, num_hit, boundary

        self.kv_cache_manager.get_computed_blocks = get_computed_blocks_leaving_scored_queries
        self._admit_by_held_blocks()

    def _admit_by_held_blocks(self) -> None:
        """vLLM admits a request only when its whole prompt fits in the free blocks
        (`scheduler_reserve_full_isl`). A request that evicts during prefill never holds its whole
        prompt: it is admitted when what it will hold at most fits (`prefill_peak_blocks`)."""
        import inspect

        kv_cache_manager = self.kv_cache_manager
        allocate_slots = kv_cache_manager.allocate_slots
        if "full_sequence_must_fit" not in inspect.signature(allocate_slots).parameters:
            raise RuntimeError("madakv-vllm cannot hook this vLLM: KVCacheManager.allocate_slots has no "
                               "full_sequence_must_fit")
        pool, block_size = kv_cache_manager.block_pool, self.evicting_manager.block_size

        def allocate_slots_admitting_by_held_blocks(request, *args, full_sequence_must_fit=False, **kwargs):
            target = self.eviction_targets.get(request.request_id)
            if full_sequence_must_fit and target is not None and target.limit is not None:
                full_sequence_must_fit = False
                replayed = max(0, request.num_tokens - target.prompt_len)  # a resumed request's output
                whole = -(-request.num_tokens // block_size)  # what vLLM's own gate asks
                need = self.num_groups * min(whole, target.prefill_peak_blocks(block_size) + -(-replayed // block_size))
                if need > pool.get_num_free_blocks():
                    return None
            return allocate_slots(request, *args, full_sequence_must_fit=full_sequence_must_fit, **kwargs)

        kv_cache_manager.allocate_slots = allocate_slots_admitting_by_held_blocks

    def add_request(self, request) -> None:
        policy = request_policy(self.eviction_config, request.sampling_params.extra_args
                                if request.sampling_params is not None else None, self.num_groups)
        # Streaming-input sessions replace the prompt between chunks: never compacted (the API
        # server refuses them when eviction applies; this is the engine's own line of defence).
        target = eviction_target(policy, request.num_prompt_tokens, self.scores_per_token, self.num_groups,
                                 self.score_bytes_limit, self.prefill_chunk)
        self.eviction_targets[request.request_id] = None if getattr(request, "resumable", False) else target
        super().add_request(request)

    def _reserve_prefill_lookahead(self, request, num_computed_tokens, num_new_tokens):
        room = super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)
        target = self.eviction_targets.get(request.request_id)
        if target is None:
            return room
        chunk = self._cut_at_points(request, target, num_computed_tokens, room)
        return self._with_probe(request, target, num_computed_tokens, chunk, room)

    def _cut_at_points(self, request, target: EvictionTarget, num_computed_tokens: int, num_new_tokens: int) -> int:
        point = target.next_compaction_point(num_computed_tokens)
        if point is None and target.limit is None and target.prompt_evicted and num_computed_tokens < target.prompt_len:
            # a resumed request re-prefills its output too: compact the prompt before recomputing
            # the output over it, as before the preemption (or its tokens come from the full cache).
            # Not yet with eviction during prefill, whose last chunk has its own scoring rules.
            point = target.prompt_len
        first_decode = self._first_decode_point(request.request_id, target)
        if first_decode is not None:  # a resumed request re-prefills its output: the same points
            point = target.decode_point_after(first_decode, num_computed_tokens)
        if point is not None and num_computed_tokens + num_new_tokens > point and not (
                self.scheduler_config.disable_chunked_mm_input and inside_multimodal_item(request, point)):
            num_new_tokens = point - num_computed_tokens  # a chunk never crosses a compaction point
        # Never split the scored queries across chunks: end this chunk just before them instead.
        start = target.prompt_len - target.score_queries
        end = num_computed_tokens + num_new_tokens
        if num_computed_tokens < start < end < target.prompt_len:
            if self.scheduler_config.disable_chunked_mm_input and inside_multimodal_item(request, start):
                return num_new_tokens  # the window is then scored over two chunks (scores accumulate)
            return start - num_computed_tokens
        return num_new_tokens

    def _with_probe(self, request, target: EvictionTarget, computed: int, num_new_tokens: int, room: int) -> int:
        """A chunk ending at a point where a compaction scored by the question's window follows
        carries that window after it: `target.probe` more rows in the same step, which the
        workers run at the window's positions (its probe). When the step's room cannot carry
        both, the chunk stops short of the point and the next step brings the rest and the probe."""
        end = computed + num_new_tokens
        held = end - self.evicting_manager.evicted_tokens.get(request.request_id, 0)
        if not (target.probe and target.compacts_after_chunk(end, held) and target.probes_at(end, request.mm_features)):
            return num_new_tokens
        if room >= num_new_tokens + target.probe:
            self.probe_points[request.request_id] = end
            return num_new_tokens + target.probe
        shorter = room - target.probe
        if shorter <= 0 or (self.scheduler_config.disable_chunked_mm_input and
                            inside_multimodal_item(request, computed + shorter)):
            return 0
        return shorter

    def schedule(self, *args, **kwargs):
        frees, plans = self._plan_compactions()
        output = super().schedule(*args, **kwargs)
        probes = {}
        for request_id, point in self.probe_points.items():
            if request_id in output.num_scheduled_tokens:  # not preempted after its chunk was sized
                # the probe's rows are not prompt tokens: the next chunk starts at the point
                request = self.requests[request_id]
                request.num_computed_tokens -= self.eviction_targets[request_id].probe
                assert request.num_computed_tokens == point, (request_id, request.num_computed_tokens, point)
                probes[request_id] = point
        self.probe_points.clear()  # outside schedule() no cap applies (the probe's tokens are rewound)
        attach_probes(output, probes)
        delivered, taken = {}, 0
        for request_id, (plan, old_blocks, first) in plans.items():
            if request_id not in self.evicting_manager.evicted_tokens:  # preempted while scheduling: plan void
                continue
            plan.block_ids = [manager.block_ids(request_id) for manager in self.evicting_managers]
            delivered[request_id] = plan
            new_blocks = sum(len(ids) for ids in plan.block_ids)
            taken += new_blocks
            if first:  # a request counts once, at its first compaction
                self.eviction_counters.add(requests=1)
            logger.debug("kv eviction: request %s logical length %d kept per group %s blocks %d -> %d",
                         request_id, plan.computed, plan.kept, old_blocks, new_blocks)
        attach_plans(output, delivered)
        if frees:
            self.frees_after_step[id(output)] = (output, frees, taken)
        return output

    def _plan_compactions(self):
        """Requests whose prompt was fully scheduled in an earlier step (and whose kept counts are
        known) get private blocks now, but only when the pool keeps enough blocks for what this
        step's schedule() will allocate to running requests: taking them would make vLLM
        preempt, often the request just compacted."""
        frees, plans = [], {}
        managers = self.evicting_managers
        due = [request for request in self.running if self._compaction_due(request)]
        if not due:  # the common step: no pass over the running requests' block needs
            return frees, plans
        needs = self._blocks_this_step()
        block_size = self.evicting_manager.block_size
        pool = self.evicting_manager.manager.block_pool  # one pool for every group
        for request in due:
            request_id = request.request_id
            target = self.eviction_targets[request_id]
            computed = request.num_computed_tokens
            covered = min(computed, target.prompt_len)  # between prefill chunks: what is computed
            kept = self._kept_per_group(request_id, target) if covered == target.prompt_len \
                else [target.kept] * self.num_groups
            decode_point = self._decode_point_due(request)
            if decode_point is not None:  # during decode: every group back to the cap (or all it holds)
                covered = decode_point
                kept = [min(target.decode_cap, covered - m.evicted_tokens.get(request_id, 0)) for m in managers]
            physical = [k + computed - covered for k in kept]
            new_blocks = sum(-(-p // block_size) for p in physical)
            # after the swap this request needs blocks for its step token in the new layout
            need_after = sum(-(-(p + 1) // block_size) for p in physical) - new_blocks
            headroom = sum(needs.values()) - needs.get(request_id, 0) + need_after
            if pool.get_num_free_blocks() < new_blocks + headroom:
                continue  # pool too short this step; tokens decoded meanwhile are carried over later
            first, old_blocks = request_id not in self.evicting_manager.evicted_tokens, []
            for manager, group_physical, group_kept in zip(managers, physical, kept):
                old_blocks += manager.swap_in_private_blocks(request_id, group_physical, covered - group_kept, covered)
            if covered == target.prompt_len:  # the prompt's own compaction: decode points start from it
                first_decode = target.first_decode_point(max(kept), computed)
                if first_decode is not None:
                    self.evicting_manager.first_decode_point[request_id] = first_decode
            needs[request_id] = need_after
            frees.extend(old_blocks)
            plans[request_id] = (CompactionPlan([], covered, kept, computed), len(old_blocks), first)
        return frees, plans

    def _kept_per_group(self, request_id: str, target: EvictionTarget) -> list[int] | None:
        if target.reported_counts:
            return self.reported_kept.get(request_id)
        return [target.kept] * self.num_groups

    def _compaction_due(self, request) -> bool:
        """The prompt was fully computed in an earlier step, the kept counts are known and the
        prompt is not compacted yet; or (during prefill) a chunk left more than the limit."""
        request_id, manager = request.request_id, self.evicting_manager
        target = self.eviction_targets.get(request_id)
        if target is None:
            return False
        if not target.prompt_evicted or manager.covered.get(request_id, 0) >= target.prompt_len:
            return self._decode_point_due(request) is not None
        computed = request.num_computed_tokens
        if computed >= target.prompt_len:
            return self._kept_per_group(request_id, target) is not None
        return target.compacts_after_chunk(computed, computed - manager.evicted_tokens.get(request_id, 0))

    def _first_decode_point(self, request_id: str, target: EvictionTarget) -> int | None:
        """Known once the prompt is compacted (its counts and when decide it); at once when only
        the output is evicted."""
        if target.decode_cap is None:
            return None
        if not target.prompt_evicted:
            return target.first_decode_point(target.prompt_len, target.prompt_len)
        return self.evicting_manager.first_decode_point.get(request_id)

    def _decode_point_due(self, request) -> int | None:
        request_id = request.request_id
        target = self.eviction_targets.get(request_id)
        first = None if target is None else self._first_decode_point(request_id, target)
        if first is None:
            return None
        return target.decode_point_due(first, request.num_computed_tokens,
                                       self.evicting_manager.covered.get(request_id, 0))

    def _blocks_this_step(self) -> dict[str, int]:
        """Blocks each running request will take in this step's schedule(), as vLLM schedules
        them: in order, each its remaining tokens (at least its next one) within the token budget."""
        budget, needs = self.max_num_scheduled_tokens, {}
        for request in self.running:
            if budget <= 0:
                break
            pending = request.num_tokens + getattr(request, "num_output_placeholders", 0) - request.num_computed_tokens
            tokens = min(max(pending, 1), budget)
            budget -= tokens
            request_id = request.request_id
            needs[request_id] = 0
            for manager in self.evicting_managers:
                physical = request.num_computed_tokens - manager.evicted_tokens.get(request_id, 0) + tokens
                held = len(manager.manager.req_to_blocks.get(request_id, ()))
                needs[request_id] += max(0, -(-physical // manager.block_size) - held)
        return needs

    def update_from_output(self, scheduler_output, model_runner_output):
        result = super().update_from_output(scheduler_output, model_runner_output)
        for request_id, kept in report_of(model_runner_output).items():
            self._take_report(request_id, kept)
        _, frees, taken = self.frees_after_step.pop(id(scheduler_output), (None, None, 0))
        if frees:  # the step that read them is done
            self._free_old_blocks(frees, taken)
        if plans_of(scheduler_output):
            self.eviction_counters.publish()
        return result

    def _take_report(self, request_id: str, kept) -> None:
        """Per-group kept counts from the workers, for a request still waiting for them."""
        target = self.eviction_targets.get(request_id)
        if target is None or not target.reported_counts or \
                self.evicting_manager.covered.get(request_id, 0) >= target.prompt_len:
            return  # finished, or already compacted (a late report after a preemption)
        kept = [int(k) for k in kept]
        if len(kept) != self.num_groups or not all(1 <= k <= target.prompt_len for k in kept) \
                or sum(kept) > target.kept * self.num_groups:
            logger.warning("KV eviction: request %s got impossible per-group counts %s; keeping %d everywhere",
                           request_id, kept, target.kept)
            kept = [target.kept] * self.num_groups
        self.reported_kept[request_id] = kept

    def _free_old_blocks(self, frees: list, taken: int) -> None:
        """Return compacted requests' old blocks; count as freed only those that really went back
        to the free pool (a prefix block another request still uses does not), net of the
        blocks the compactions took."""
        self.kv_cache_manager.block_pool.free_blocks(reversed(frees))
        returned = sum(1 for block in frees if block.ref_cnt == 0)
        self.eviction_counters.add(blocks_freed=max(0, returned - taken))

    def reset_prefix_cache(self, reset_running_requests: bool = False, *args, **kwargs):
        # vLLM needs every block free. Old blocks of plans whose step is still in flight go back
        # first when it preempts every running request (that step's outputs are dropped) or when
        # nothing runs (no request of that step is left to read them; a later step that reuses
        # the blocks is ordered after it on the device).
        if reset_running_requests or not self.running:
            self.flush_pending_frees()
        return super().reset_prefix_cache(reset_running_requests, *args, **kwargs)

    def flush_pending_frees(self) -> None:
        for _, frees, taken in self.frees_after_step.values():
            self._free_old_blocks(frees, taken)
        self.frees_after_step.clear()

    def _free_request(self, request, *args, **kwargs):
        self.eviction_targets.pop(request.request_id, None)
        self.reported_kept.pop(request.request_id, None)
        return super()._free_request(request, *args, **kwargs)


class EvictingScheduler(EvictingSchedulerMixin, Scheduler):
    pass


class AsyncEvictingScheduler(EvictingSchedulerMixin, AsyncScheduler):
    pass
