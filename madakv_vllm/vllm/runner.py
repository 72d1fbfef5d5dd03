"""Worker side: hooks on one V1 model runner (`vllm/v1/worker/gpu_model_runner.py`, which the
CPU runner subclasses), installed once its KV cache exists.

- `_update_states` (after): track new requests; reset resumed ones; apply compaction plans:
  select keep indices from the accumulated scores, `compact_kv` every layer into the plan's
  blocks of its KV-cache group, swap the block-table rows, remember E_g = evicted tokens per group.
  Between prefill chunks (`during_prefill`) the same, over the tokens computed so far: each
  head's survivors are remembered by logical position (`survivors`), so later scores land at
  logical positions and the next selection knows what each head still holds.
- `_prepare_inputs` (after): for compacted requests give attention physical `seq_lens` and
  write slots at `position - E_g`; positions (RoPE, M-RoPE) stay logical. List the rows of this
  step's queries that score a prompt (the last `score_queries` prompt tokens). A probe's rows
  (`prefill_scores: appended`) become the question's window: its token ids at its own positions,
  its keys in scratch slots right after the chunk's; they score the point the chunk ends at.
- `execute_model` (after): for prompts whose scoring finished in this step and whose groups keep
  counts that depend on the scores, plan the per-group counts (tensor-parallel ranks agree by
  averaging their layer demands); `sample_tokens` (after) reports them on the step's output.
- with several KV-cache groups, each group's attention-metadata build: its exact lengths
  (logical - E_g) on the device (group 0: the runner's own `seq_lens`, corrected in place) and on
  the host (`seq_lens_cpu_upper_bound`, `max_seq_len`, which FlashInfer plans from);
  `_dummy_run` (before): those offsets are zero, not the last real step's.
- `_determine_batch_execution_and_padding`: a step with scoring rows never replays a FULL
  cudagraph (attention must run its Python for the scoring hook).
- each decoder layer's `impl.forward` (after): score those rows against the layer's paged keys.
"""
from __future__ import annotations

import copy
import functools
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from madakv_kernels import (
    MODALITY_TAGS,
    TEXT,
    compact_kv,
    held_mask,
    logical_positions,
    paged_dims,
    physical_indices,
    queries_after_every_key,
    value_norms,
    window_scores,
)

from ..policies import EvictionPolicy
from .kv_layout import check_layout, key_value_views
from .metrics import Counters
from .protocol import attach_report, plans_of, probes_of
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


def modality_tags(mm_features, prompt_len: int) -> torch.Tensor:
    """Per-token tags from the request's multimodal placeholder ranges (restricted to the
    positions that receive embeddings); everything else is text."""
    tags = torch.full((prompt_len,), TEXT, dtype=torch.int8)
    for feature in mm_features or ():
        tag = MODALITY_TAGS.get(feature.modality)
        if tag is None:  # e.g. audio: scored and ranked as text
            continue
        pos = feature.mm_position
        span = torch.arange(pos.offset, min(pos.offset + pos.length, prompt_len))
        if pos.is_embed is not None:
            span = span[pos.is_embed[: span.numel()].bool()]
        tags[span] = tag
    return tags


@dataclass
class RequestEviction:
    policy: EvictionPolicy
    target: EvictionTarget
    tags: torch.Tensor
    scores: torch.Tensor | None = None  # [layers, kv_heads, prompt_len] fp32, allocated at the first score
    scored_layers: set[int] = field(default_factory=set)
    scores_for: int = 0  # the chunk end (or prompt length) the scores are gathered for
    evicted: list[int] | None = None  # per KV-cache group, once compacted
    # between prefill chunks: per layer, the logical positions each head kept [H, S] (physical slots
    # 0..S-1); tokens computed after `covered` follow them in order
    survivors: list[torch.Tensor] | None = None
    covered: int = 0
    final: bool = False  # the prompt is compacted (or only the output is evicted): only decode points left
    first_decode: int | None = None  # eviction during decode: the first point (EvictionTarget.first_decode_point)
    seconds: float = 0.0  # scoring + compaction

    def held_view(self, end: int) -> torch.Tensor | None:
        """Bool [L, H, end]: the logical tokens each head holds (None: all of them)."""
        present = held_mask(self.survivors, end)
        if present is not None:
            present[..., self.covered:] = True  # computed after the last compaction
        return present

    def logical_positions(self, layer: int, held: int) -> torch.Tensor | None:
        """[H, held]: the logical position of each physical slot (None: the same as the slot)."""
        return None if self.survivors is None else logical_positions(self.survivors[layer], self.covered, held)


@dataclass
class ScoringRows:
    """Rows [start, end) of this step's queries are the last end - start of the first
    `context_lens[g]` tokens the request holds in KV-cache group g (physical; logical when nothing
    is compacted yet) and score them; or, for a probe (`after_keys`), queries that follow all of
    those tokens, each scoring every one of them."""

    request: RequestEviction
    start: int
    end: int
    context_lens: list[int]
    block_tables: list[torch.Tensor]  # the request's row, per KV-cache group
    after_keys: bool = False


class WorkerEviction:
    def __init__(self, runner):
        self.runner = runner
        self.base_config = engine_config(runner.vllm_config.additional_config)
        groups = runner.kv_cache_config.kv_cache_groups
        self.num_groups = layer_groups(runner.vllm_config.additional_config)
        if len(groups) != self.num_groups:
            raise RuntimeError(f"KV eviction expected {self.num_groups} KV-cache group(s), "
                               f"this model has {len(groups)}")
        self.block_size = groups[0].kv_cache_spec.block_size
        sizes = [g.kv_cache_spec.block_size for g in groups] + list(getattr(runner, "_kernel_block_sizes", []))
        if set(sizes) != {self.block_size}:
            raise RuntimeError(f"KV eviction needs the attention kernel block size to equal the cache block size "
                               f"({sizes}); pass a --block-size the backend supports natively")
        context = runner.compilation_config.static_forward_context
        # layers in model order (groups are contiguous buckets of layers), and each one's group
        self.layers = [context[name] for group in groups for name in group.layer_names]
        self.layer_group = [g for g, group in enumerate(groups) for _ in group.layer_names]
        self.group_first_layer = [self.layer_group.index(g) for g in range(self.num_groups)]
        check_layout(self.layers[0], self.layers[0].impl, self.layers[0].kv_cache)
        heads = set()
        for layer in self.layers:
            keys, _, layout = key_value_views(layer.kv_cache, layer.impl)
            heads.add(paged_dims(keys, layout)[1])
        if len(heads) != 1:  # compat.check_vllm_config refuses such models from their config already
            raise RuntimeError(f"KV eviction needs the same KV-head count in every layer, found {sorted(heads)}")
        self.num_kv_heads = heads.pop()
        self.scores_per_token = len(self.layers) * self.num_kv_heads  # the scheduler computes the same
        self.score_bytes_limit = max_score_bytes(runner.vllm_config.additional_config)  # the scheduler's too
        self.prefill_chunk = prefill_chunk_tokens(runner.vllm_config)  # the scheduler's too
        self.requests: dict[str, RequestEviction] = {}
        self.step_rows: list[ScoringRows] = []
        # per-step inputs staged in pinned host memory (the runner's own buffer type)
        self.evicted_per_request = runner._make_buffer(runner.max_num_reqs, dtype=torch.int32)  # group 0's
        self.evicted_per_token = [runner._make_buffer(runner.max_num_tokens, dtype=torch.int64)
                                  for _ in range(self.num_groups)]
        self.completing: list[str] = []  # prompts whose scoring finishes in this step
        self.pending_reports: dict[str, list[int]] = {}  # per-group kept counts not yet on an output
        self.device = runner.device
        # Every tensor-parallel rank holds its share of the KV heads: each publishes its per-head
        # averages divided by the TP size, so their sum is the average over all heads.
        self.tp_rank, self.tp_size = _tensor_parallel_rank_and_size()
        self.counters = Counters("worker")
        for index, layer in enumerate(self.layers):
            layer.impl.forward = self._scoring_forward(index, layer.impl.forward, layer.impl)
        runner._determine_batch_execution_and_padding = without_full_graphs_while_scoring(
            runner._determine_batch_execution_and_padding, lambda: bool(self.step_rows))
        runner._update_states = self._after(runner._update_states, self.after_update_states)
        runner._gather_mm_embeddings = self._without_probe_rows(runner._gather_mm_embeddings)
        runner._prepare_inputs = self._after(runner._prepare_inputs, self.after_prepare_inputs)
        execute_model, sample_tokens = runner.execute_model, runner.sample_tokens

        @functools.wraps(execute_model)
        def execute_model_then_plan_counts(*args, **kwargs):
            try:
                output = execute_model(*args, **kwargs)
                self.plan_group_counts()
                return self.with_reports(output)
            finally:
                self.step_rows, self.completing = [], []

        @functools.wraps(sample_tokens)
        def sample_tokens_with_reports(*args, **kwargs):
            return self.with_reports(sample_tokens(*args, **kwargs))

        runner.execute_model = execute_model_then_plan_counts
        runner.sample_tokens = sample_tokens_with_reports
        if self.num_groups > 1:
            # persistent per group (FULL cudagraphs read them at the address they were captured with)
            self.group_seq_lens = [torch.zeros_like(runner.seq_lens) for _ in range(self.num_groups)]
            self.seq_len_offsets = [runner._make_buffer(runner.max_num_reqs, dtype=torch.int32)
                                    for _ in range(self.num_groups)]
            # host lengths of group g = the runner's upper bound (logical - min E) + this (min E - E_g)
            self.cpu_len_offsets = np.zeros((self.num_groups, runner.max_num_reqs), dtype=np.int32)
            for g in range(self.num_groups):
                for attn_group in runner.attn_groups[g]:
                    self._use_group_seq_lens(attn_group, g)
            runner._dummy_run = self._before(runner._dummy_run, self.clear_group_offsets)
        logger.info("KV eviction hooks installed on %s (%d layers in %d KV-cache group(s), block size %d)",
                    type(runner).__name__, len(self.layers), self.num_groups, self.block_size)

    @staticmethod
    def _before(method, hook):
        @functools.wraps(method)
        def wrapped(*args, **kwargs):
            hook()
            return method(*args, **kwargs)

        return wrapped

    @staticmethod
    def _after(method, hook):
        @functools.wraps(method)
        def wrapped(*args, **kwargs):
            result = method(*args, **kwargs)
            hook(*args, **kwargs)
            return result

        return wrapped

    def _use_group_seq_lens(self, attn_group, g: int) -> None:
        """Every group attends over its own physical lengths, exactly, on the device and on the
        host. Device: group 0 uses the runner's seq_lens (corrected in place); group g > 0 those
        + E_0 - E_g, written in place into a persistent tensor. Host: `seq_lens_cpu_upper_bound`
        (the runner's is logical - min_g E_g, an upper bound only) + min E - E_g, and its
        `max_seq_len`: backends that plan on the host (FlashInfer: page counts, last-page lengths)
        take them as exact. vLLM would otherwise reuse group 0's metadata with another block
        table (`update_block_table`), so that shortcut is off for g > 0."""
        if g > 0:
            for builder in attn_group.metadata_builders:
                builder.supports_update_block_table = False

        def with_group_seq_lens(build, capture: bool):
            @functools.wraps(build)
            def build_for_group(common_attn_metadata, *args, **kwargs):
                n = common_attn_metadata.seq_lens.shape[0]
                metadata = copy.copy(common_attn_metadata)
                if g > 0:
                    seq_lens = self.group_seq_lens[g][:n]
                    torch.add(common_attn_metadata.seq_lens, self.seq_len_offsets[g].gpu[:n], out=seq_lens)
                    metadata.seq_lens = seq_lens
                upper_bound = common_attn_metadata.seq_lens_cpu_upper_bound
                if upper_bound is not None:
                    exact = upper_bound + torch.from_numpy(self.cpu_len_offsets[g][:n])
                    metadata.seq_lens_cpu_upper_bound = exact
                    if not capture and n:  # capture keeps vLLM's max_model_len (kernel choice)
                        metadata.max_seq_len = int(exact.max())
                return build(metadata, *args, **kwargs)

            return build_for_group

        attn_group.build_metadata = with_group_seq_lens(attn_group.build_metadata, capture=False)
        attn_group.build_metadata_for_cudagraph_capture = with_group_seq_lens(
            attn_group.build_metadata_for_cudagraph_capture, capture=True)

    def clear_group_offsets(self) -> None:
        """Dummy runs (profiling, cudagraph capture, data-parallel padding steps) build metadata
        without `_prepare_inputs`: every group then attends over the dummy lengths themselves."""
        for g in range(1, self.num_groups):
            self.seq_len_offsets[g].np[:] = 0
            self.seq_len_offsets[g].copy_to_gpu()
        self.cpu_len_offsets[:] = 0

    # ---- request state -----------------------------------------------------------------------
    def _track(self, req_state) -> None:
        extra = req_state.sampling_params.extra_args if req_state.sampling_params is not None else None
        policy = request_policy(self.base_config, extra, self.num_groups)
        target = eviction_target(policy, req_state.num_prompt_tokens, self.scores_per_token, self.num_groups,
                                 self.score_bytes_limit, self.prefill_chunk)
        if target is None:
            self.requests.pop(req_state.req_id, None)
            return
        state = RequestEviction(policy, target, modality_tags(req_state.mm_features, target.prompt_len))
        if not target.prompt_evicted:  # only the output is evicted
            state.final, state.first_decode = True, target.first_decode_point(target.prompt_len, target.prompt_len)
        self.requests[req_state.req_id] = state

    def after_update_states(self, scheduler_output, *args, **kwargs) -> None:
        runner = self.runner
        for req_id in scheduler_output.finished_req_ids:
            self.requests.pop(req_id, None)
        # preempted: its blocks are gone and its scores (up to MAX_SCORE_BYTES, outside vLLM's
        # budget) useless; a resumed request is tracked afresh below
        for req_id in scheduler_output.preempted_req_ids or ():
            self.requests.pop(req_id, None)
        for new_req in scheduler_output.scheduled_new_reqs:
            self._track(runner.requests[new_req.req_id])
        for req_id in scheduler_output.scheduled_cached_reqs.resumed_req_ids:
            if req_id in runner.requests:  # preempted: its blocks were replaced, re-prefill re-evicts
                self._track(runner.requests[req_id])
        for req_id, plan in plans_of(scheduler_output).items():
            self.apply_plan(req_id, plan)

    def _scores_for_plan(self, req_id: str, state: RequestEviction, covered: int) -> torch.Tensor | None:
        """The scores of the tokens held, [L, H, covered] at logical positions (0 where a head
        no longer holds the token)."""
        if not state.policy.needs_scores:
            return None
        missing = sorted(set(range(len(self.layers))) - state.scored_layers)
        if missing or state.scores_for != covered:
            raise RuntimeError(f"KV eviction: request {req_id} reached compaction over {covered} tokens with scores "
                               f"for {state.scores_for} tokens, layers {missing[:5]} missing")
        return state.scores[..., :covered]

    def apply_plan(self, req_id: str, plan) -> None:
        state, req_state = self.requests.get(req_id), self.runner.requests.get(req_id)
        if state is None or req_state is None:
            # The scheduler already gave the request its new blocks and freed the old ones: running
            # on with the old row would write into freed blocks. Both sides decide from the same
            # request and engine config, so this is a bug, never a case to skip.
            raise RuntimeError(f"KV eviction: the scheduler compacted request {req_id}, which this worker "
                               f"{'does not know' if req_state is None else 'does not evict'}")
        started = time.perf_counter()
        covered, target = plan.covered, state.target
        decoding = covered > target.prompt_len  # a compaction during decode: the output's tokens are text
        scores = self._scores_for_plan(req_id, state, covered)
        tags = state.tags[:covered].to(self.device)
        if decoding:
            tags = torch.cat([tags, tags.new_full((covered - target.prompt_len,), TEXT)])
        present = state.held_view(covered)  # what earlier compactions left
        # the plan's per-group counts are what the scheduler allocated: select exactly those
        kept = target.decode_cap if decoding else target.kept
        tail = state.policy.protected_tail(kept)
        budgets = [plan.kept[g] - tail for g in self.layer_group]
        keep = state.policy.select(scores, tags, num_layers=len(self.layers), num_kv_heads=self.num_kv_heads,
                                   budgets=budgets, kept=kept, present=present)
        if keep is None:
            raise RuntimeError(f"KV eviction: request {req_id} has nothing to evict at {covered} tokens")
        before = state.evicted or [0] * self.num_groups
        src = [torch.tensor(ids, dtype=torch.int32, device=self.device) for ids in req_state.block_ids]
        dst = [torch.tensor(ids, dtype=torch.int32, device=self.device) for ids in plan.block_ids]
        for index, (layer, g, layer_keep) in enumerate(zip(self.layers, self.layer_group, keep)):
            keys, values, layout = key_value_views(layer.kv_cache, layer.impl)
            slots = layer_keep if present is None else physical_indices(layer_keep, present[index])
            # tokens computed after the selected ones (decoded since the prompt) follow them
            later = torch.arange(covered - before[g], plan.computed - before[g], device=self.device)
            compact_kv(keys, values, src[g], dst[g],
                       torch.cat([slots.to(self.device), later.expand(self.num_kv_heads, -1)], dim=1), layout)
        req_state.block_ids = tuple(list(ids) for ids in plan.block_ids)
        row = self.runner.input_batch.req_id_to_index.get(req_id)
        if row is not None:
            # cleared first: entries past the new length would name the old blocks, freed soon
            self.runner.input_batch.block_table.clear_row(row)
            self.runner.input_batch.block_table.add_row(req_state.block_ids, row)
        state.evicted = [covered - kept for kept in plan.kept]
        state.survivors, state.covered, state.final = keep, covered, covered >= target.prompt_len
        state.seconds += time.perf_counter() - started
        if not state.final:  # between prefill chunks: the next chunk scores afresh
            return
        state.scores, scores = None, None  # the largest per-request buffer: freed right after the plan
        if decoding:  # its window's scoring and this compaction, on the first rank (as the prompt's seconds)
            if self.tp_rank == 0:
                self.counters.add(decode_compactions=1, decode_seconds=state.seconds)
                self.counters.publish()
            state.seconds = 0.0
            return
        state.first_decode = target.first_decode_point(max(plan.kept), plan.computed)
        counts = kept_and_evicted_by_modality(keep, tags)
        self.counters.add(**{key: value / self.tp_size for key, value in counts.items()})
        if self.tp_rank == 0:  # one observation per request; per-layer counts are per head, the same on every rank
            self.counters.observe_seconds(state.seconds)
            self.counters.add_layer_kept([int(layer_keep.shape[1]) for layer_keep in keep])
        self.counters.publish()  # written by a background thread

    def plan_group_counts(self) -> None:
        """After the forward: the per-group kept counts of prompts whose scoring just finished,
        when they depend on the scores (reported to the scheduler, which allocates for them)."""
        for req_id in self.completing:
            state = self.requests.get(req_id)
            if state is None or not state.target.reported_counts:
                continue
            started = time.perf_counter()
            tags = state.tags.to(self.device)
            scores, present = self._scores_for_plan(req_id, state, state.target.prompt_len), None
            if state.survivors is not None:  # compacted between chunks: no layer can keep more than it holds
                present = state.held_view(state.target.prompt_len)
                scores = None if scores is None else scores.masked_fill(~present, 0.0)
            budgets = state.policy.plan_budgets(scores, tags, len(self.layers), average=self._average_over_ranks,
                                                held=None if present is None else int(present[0, 0].sum()))
            tail = state.policy.protected_tail(state.target.kept)
            self.pending_reports[req_id] = [budgets[layer] + tail for layer in self.group_first_layer]
            state.seconds += time.perf_counter() - started

    def _average_over_ranks(self, demands: torch.Tensor) -> torch.Tensor:
        """Each tensor-parallel rank holds the same number of KV heads: the mean of the ranks'
        per-head means is the mean over all heads, identical on every rank."""
        if self.tp_size == 1:
            return demands
        from vllm.distributed import tensor_model_parallel_all_reduce

        return tensor_model_parallel_all_reduce(demands.to(self.device)).cpu() / self.tp_size

    def with_reports(self, output):
        if self.pending_reports and attach_report(output, self.pending_reports):
            self.pending_reports = {}
        return output

    # ---- per step ----------------------------------------------------------------------------
    def after_prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs) -> None:
        runner, batch = self.runner, self.runner.input_batch
        num_reqs = batch.num_reqs
        req_ids = batch.req_ids[:num_reqs]
        computed = batch.num_computed_tokens_cpu[:num_reqs]
        starts = runner.query_start_loc.np[:num_reqs]
        scheduled = num_scheduled_tokens[:num_reqs]
        num_tokens = int(scheduled.sum())
        probes = probes_of(scheduler_output)
        evicted = np.zeros((self.num_groups, num_reqs), dtype=np.int64)
        for i, req_id in enumerate(req_ids):
            state = self.requests.get(req_id)
            if state is not None and state.evicted is not None:
                evicted[:, i] = state.evicted
        if evicted.any():
            # Attention sees each group's physical cache; the new tokens' slots follow the kept
            # ones. Pinned staging + non-blocking copies, as the runner's own inputs (no stream sync).
            stage = self.evicted_per_request
            stage.np[:num_reqs] = evicted[0]
            runner.seq_lens[:num_reqs] -= stage.copy_to_gpu(num_reqs)
            runner.optimistic_seq_lens_cpu[:num_reqs] -= torch.from_numpy(evicted.min(axis=0))  # upper bound
        probe_shift = self._place_probes(probes, req_ids, starts, computed, num_tokens) if probes else 0
        if evicted.any() or probes:
            for g in range(self.num_groups):
                per_token = self.evicted_per_token[g]
                per_token.np[:num_tokens] = np.repeat(evicted[g], scheduled) + probe_shift
                physical = runner.positions[:num_tokens] - per_token.copy_to_gpu(num_tokens)
                batch.block_table[g].compute_slot_mapping(num_reqs, runner.query_start_loc.gpu[: num_reqs + 1],
                                                          physical)
        if self.num_groups > 1:  # every step: zeros clear the last step's offsets
            self.cpu_len_offsets[:] = 0
            self.cpu_len_offsets[:, :num_reqs] = evicted.min(axis=0) - evicted
        for g in range(1, self.num_groups):
            offsets = self.seq_len_offsets[g]
            offsets.np[:] = 0
            offsets.np[:num_reqs] = evicted[0] - evicted[g]
            offsets.copy_to_gpu()
        block_tables = [batch.block_table[g].get_device_tensor(num_reqs) for g in range(self.num_groups)]
        rows, completing = [], []
        for i, req_id in enumerate(req_ids):
            state = self.requests.get(req_id)
            if state is None or (state.final and state.first_decode is None):
                continue
            target, start = state.target, int(computed[i])
            probe_point = probes.get(req_id)
            done = start + int(scheduled[i]) - (0 if probe_point is None else target.probe)  # the chunk's end
            if not state.final and start < target.prompt_len <= done:
                completing.append(req_id)
            if not state.policy.needs_scores:
                continue
            before = state.evicted or [0] * self.num_groups
            after_keys = False
            if state.final:  # during decode: the last queries before the next point score what is held
                point = target.decode_point_after(state.first_decode, start)
                lo, hi, scores_for = max(start, point - target.decode_queries), min(done, point), point
            else:
                # the proxy window scores the prompt; during prefill, the last queries before a point
                # where a compaction will follow score the tokens held there (the scheduler decides
                # alike), over one or two chunks as they come
                lo, hi, scores_for = max(start, target.prompt_len - target.score_queries), \
                    min(done, target.prompt_len), target.prompt_len
                point = target.next_compaction_point(start)
                if lo >= hi and point is not None and target.compacts_after_chunk(point, point - before[0]):
                    if probe_point is not None:  # the question's window, run right after the chunk
                        if probe_point != point:
                            raise RuntimeError(f"KV eviction: request {req_id} got a probe at {probe_point}, "
                                               f"its next compaction point is {point}")
                        lo, hi, scores_for, after_keys = point, point + target.probe, point, True
                    elif target.probes_at(point, runner.requests[req_id].mm_features):
                        lo = hi  # the probe that follows the chunk ending there will score the point
                    else:
                        lo, hi, scores_for = max(start, point - target.score_queries), min(done, point), point
            if probe_point is not None and not after_keys:  # both sides decide alike: a bug, never a case to skip
                raise RuntimeError(f"KV eviction: request {req_id} got a probe at {probe_point} that scores nothing")
            if lo < hi:
                if state.scores_for != scores_for:  # a new selection: the last one's scores are spent
                    state.scores_for = scores_for
                    state.scored_layers.clear()
                    if state.scores is not None:
                        state.scores.zero_()
                first_row = int(starts[i]) + lo - start
                held = [(lo if after_keys else hi) - e for e in before]  # a probe scores what precedes it
                rows.append(ScoringRows(state, first_row, first_row + hi - lo, held,
                                        [table[i] for table in block_tables], after_keys))
        self.step_rows, self.completing = rows, completing

    def _place_probes(self, probes: dict[str, int], req_ids, starts, computed, num_tokens: int) -> np.ndarray:
        """Turn each probe's rows (its request's last `probe` rows this step, scheduled as the
        prompt tokens after its chunk) into the question's window: the prompt's last tokens at their
        own positions (M-RoPE too). Returns what to add, per row, to the evicted count: the
        window's keys then land in the slots right after the chunk's, which the next chunk
        overwrites or the compaction leaves behind."""
        runner, shift = self.runner, np.zeros(num_tokens, dtype=np.int64)
        for i, req_id in enumerate(req_ids):
            point = probes.get(req_id)
            if point is None:
                continue
            target = self.requests[req_id].target
            n, w = target.prompt_len, target.probe
            first = int(starts[i]) + point - int(computed[i])
            rows = slice(first, first + w)
            shift[rows] = n - w - point
            window = torch.from_numpy(runner.input_batch.token_ids_cpu[i, n - w : n])
            runner.input_ids.gpu[rows] = window.to(self.device, runner.input_ids.gpu.dtype)
            runner.positions[rows] += n - w - point
            if runner.uses_mrope:
                mrope = runner.requests[req_id].mrope_positions[:, n - w : n]
                runner.mrope_positions.gpu[:, rows] = mrope.to(self.device, runner.mrope_positions.gpu.dtype)
        return shift

    def _without_probe_rows(self, gather):
        """vLLM merges a request's image and video embeddings into the rows of the positions it
        schedules: a probe's rows, scheduled as the positions after its chunk, must get none (they
        are the question's text). The gather sees each chunk without its probe, and the probe's
        rows are put back as text rows."""

        @functools.wraps(gather)
        def gather_for_chunks(scheduler_output, *args, **kwargs):
            probes = probes_of(scheduler_output)
            if not probes:
                return gather(scheduler_output, *args, **kwargs)
            chunks = copy.copy(scheduler_output)
            chunks.num_scheduled_tokens = {req_id: count - (self.requests[req_id].target.probe if req_id in probes
                                                            else 0)
                                           for req_id, count in scheduler_output.num_scheduled_tokens.items()}
            chunks.total_num_scheduled_tokens = sum(chunks.num_scheduled_tokens.values())
            mm_embeds, is_mm_embed = gather(chunks, *args, **kwargs)
            rows = torch.zeros(scheduler_output.total_num_scheduled_tokens, dtype=torch.bool,
                               pin_memory=is_mm_embed.is_pinned())
            start, row = 0, 0
            for req_id in self.runner.input_batch.req_ids:  # the order the gather and the batch use
                count = chunks.num_scheduled_tokens[req_id]
                rows[row : row + count] = is_mm_embed[start : start + count]
                start, row = start + count, row + scheduler_output.num_scheduled_tokens[req_id]
            return mm_embeds, rows

        return gather_for_chunks

    def _scoring_forward(self, layer_index: int, forward, impl):
        @functools.wraps(forward)
        def forward_then_score(layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs):
            output = forward(layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs)
            if self.step_rows and attn_metadata is not None:
                self._score(layer_index, impl, query, kv_cache)
            return output

        return forward_then_score

    def _score(self, layer_index: int, impl, query: torch.Tensor, kv_cache: torch.Tensor) -> None:
        started = time.perf_counter()
        keys, values, layout = key_value_views(kv_cache, impl)
        head_dim = keys.shape[-1]
        group = self.layer_group[layer_index]
        for rows in self.step_rows:
            queries = query[rows.start : rows.end].reshape(rows.end - rows.start, -1, head_dim)
            if rows.after_keys:
                queries = queries_after_every_key(queries, self.num_kv_heads)
            context_len = rows.context_lens[group]
            psi = window_scores(keys, rows.block_tables[group], queries, context_len, layout=layout, scale=impl.scale)
            state = rows.request
            if state.policy.value_weighted:  # per token, so summing weighted parts over steps is the same
                psi *= value_norms(values, rows.block_tables[group], context_len, layout=layout)
            if state.scores is None or state.scores.shape[-1] < state.scores_for:
                # one buffer for all layers (no per-layer tensors, no stack copy): the prompt's, or
                # up to a point during decode
                state.scores = torch.zeros(len(self.layers), psi.shape[0],
                                           max(state.target.prompt_len, state.scores_for), device=psi.device)
            positions = state.logical_positions(layer_index, context_len)
            if positions is None:
                state.scores[layer_index, :, :context_len] += psi
            else:  # compacted between prefill chunks: each head's slots hold other logical tokens
                state.scores[layer_index].scatter_add_(1, positions, psi)
            state.scored_layers.add(layer_index)
        elapsed = time.perf_counter() - started  # shared by this step's scored requests
        for rows in self.step_rows:
            rows.request.seconds += elapsed / len(self.step_rows)


def without_full_graphs_while_scoring(determine_batch_execution, has_scoring_rows):
    """A FULL cudagraph replays attention without running its Python, so the scoring hook would
    never see a step whose batch looks like a uniform decode (e.g. one scored prompt token per
    request). Such steps are dispatched as mixed batches instead: PIECEWISE graphs (attention
    runs eagerly between them) under FULL_AND_PIECEWISE, eager under FULL_DECODE_ONLY."""

    @functools.wraps(determine_batch_execution)
    def determine_without_full_graphs(*args, **kwargs):
        if has_scoring_rows():
            kwargs["force_uniform_decode"] = False
        return determine_batch_execution(*args, **kwargs)

    return determine_without_full_graphs


def kept_and_evicted_by_modality(keep: list[torch.Tensor], tags: torch.Tensor) -> dict[str, float]:
    """Prompt tokens kept and evicted per modality, averaged over layers and KV heads (layers
    may keep different counts). Counted on the device, read back once."""
    heads_and_layers = sum(layer_keep.shape[0] for layer_keep in keep)
    tag_values = torch.tensor(list(MODALITY_TAGS.values()), dtype=tags.dtype, device=tags.device)
    kept_tags = torch.cat([tags[layer_keep].flatten() for layer_keep in keep])
    kept = (kept_tags[:, None] == tag_values).sum(dim=0)
    present = (tags[:, None] == tag_values).sum(dim=0)
    kept, present = torch.stack([kept, present]).tolist()
    counts = {}
    for i, name in enumerate(MODALITY_TAGS):
        counts[f"kept_{name}"] = kept[i] / heads_and_layers
        counts[f"evicted_{name}"] = present[i] - kept[i] / heads_and_layers
    return counts


def _tensor_parallel_rank_and_size() -> tuple[int, int]:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except (AssertionError, ImportError):
        return 0, 1


def install(runner) -> None:
    if getattr(runner, "kv_eviction", None) is None:
        runner.kv_eviction = WorkerEviction(runner)
