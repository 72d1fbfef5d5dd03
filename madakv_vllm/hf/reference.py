"""The HF reference path: evict a transformers model's KV cache right after prefill.

`generate_with_eviction` runs the model's own `generate`, with three additions that are only
active for the duration of the call:
1. the "sdpa" attention function is wrapped, so each decoder layer's post-RoPE prefill queries
   (the last `policy.score_queries(N)` of them) are captured on their way into attention;
2. a logits processor runs once, right after the prefill forward (whose logits picked the
   first token, as in vLLM): it scores each layer's cached keys with the proxy window
   (`madakv_kernels.window_scores`), asks the policy for keep indices and shrinks the cache;
3. the shrunk layers report their logical length, so `cache_position` and M-RoPE positions
   continue from N while attention reads only the kept tokens.
This is the oracle the vLLM path is compared with, token for token. Batch size 1.

With `prefill_chunk=C` the prompt is prefilled in chunks as vLLM schedules one request with a
token budget of C (`prefill_chunks`); a policy with `during_prefill` then also compacts the
cache between chunks (`PrefillEviction`), so it never holds more than its kept count + slack +
one chunk per head and layer. Compacted layers hold each head's survivors densely; their
logical positions (`positions`) map scores and selections between the two views.

`generate_sweep` gives the same tokens for many policies at the cost of one prefill (each
policy evicts its own copy of the full cache): what the ablation benchmark uses.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from madakv_kernels import (
    IMAGE,
    MODALITY_TAGS,
    TEXT,
    VIDEO,
    dense_as_paged,
    held_mask,
    key_novelty,
    logical_positions,
    physical_indices,
    queries_after_every_key,
    value_norms,
    window_scores,
)

from ..policies import EvictionPolicy
from ..policies.base import probe_fits


@dataclass
class EvictionReport:
    """What eviction did to one request: prompt length and tokens kept per layer (per head)."""

    prompt_len: int = 0
    kept_per_layer: list[int] = field(default_factory=list)
    modality_counts: dict[str, int] = field(default_factory=dict)
    keep_indices: list[torch.Tensor] | None = None  # per layer [H, K_l]; None = nothing evicted
    # during prefill (policy.during_prefill): (chunk end, per-layer logical keep indices) of each
    # compaction between chunks, and the most tokens a head held in a layer at any time
    prefill_compactions: list[tuple[int, list[torch.Tensor]]] = field(default_factory=list)
    peak_held: int = 0
    # during decode (policy.decode_budget): (logical length, per-layer logical keep indices) of each
    # compaction, and the most tokens a layer held at any decode step
    decode_compactions: list[tuple[int, list[torch.Tensor]]] = field(default_factory=list)
    decode_peak_held: int = 0

    @property
    def kept_ratio(self) -> float:
        if not self.kept_per_layer:
            return 1.0
        return sum(self.kept_per_layer) / (len(self.kept_per_layer) * self.prompt_len)


def modality_tags(input_ids: torch.Tensor, config) -> torch.Tensor:
    """Per-token tags (0 text, 1 image, 2 video) from the placeholder ids in a model config.

    Works for LLaVA (`image_token_index`) and Qwen2-VL / Qwen2.5-VL (`image_token_id`,
    `video_token_id`); start/end markers and chat-template tokens count as text.
    """
    tags = torch.full_like(input_ids, TEXT, dtype=torch.int8)
    for tag, names in ((IMAGE, ("image_token_id", "image_token_index")), (VIDEO, ("video_token_id",))):
        for name in names:
            token_id = getattr(config, name, None)
            if token_id is not None:
                tags[input_ids == token_id] = tag
                break
    return tags


_EVICTED_CLASSES: dict[type, type] = {}


def _evicted_layer(layer, keys: torch.Tensor, values: torch.Tensor, logical_len: int):
    """Give a cache layer its kept tensors; it keeps reporting the logical length, so
    generate's cache_position (and M-RoPE positions) continue from the prompt length."""
    base = type(layer)
    if base not in _EVICTED_CLASSES:  # a subclass per layer type, so isinstance checks still hold
        def get_seq_length(self) -> int:
            return self.keys.shape[-2] + self.evicted_tokens

        _EVICTED_CLASSES[base] = type(f"Evicted{base.__name__}", (base,), {"get_seq_length": get_seq_length})
    layer.__class__ = _EVICTED_CLASSES[base]
    layer.keys, layer.values = keys, values
    layer.evicted_tokens = logical_len - keys.shape[-2]
    return layer


def decoder_attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer of the language model, in order."""
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find decoder layers in {type(model).__name__}")
    return [layer.self_attn for layer in layers]


class _Capture:
    """Captures the last `window(N)` post-RoPE queries of each layer during the prefill forward."""

    def __init__(self, model, window: Callable[[int], int]):
        self.window = window
        self.layer_of = {id(m): i for i, m in enumerate(decoder_attention_modules(model))}
        self.queries: dict[int, torch.Tensor] = {}  # layer -> [W, Hq, D]
        self.scaling: dict[int, float | None] = {}
        self.done = False
        self.decode: DecodeEviction | None = None  # scores the decode queries before a compaction

    def wrap(self, attention_fn):
        def attention(module, query, key, value, attention_mask, *args, **kwargs):
            layer = self.layer_of.get(id(module))
            if layer is not None:
                if not self.done:  # a prefill forward (or chunk): the last one scores the prompt
                    w = self.window(query.shape[2])
                    self.queries[layer] = query[0, :, -w:].transpose(0, 1).detach()
                    self.scaling[layer] = kwargs.get("scaling")
                elif self.decode is not None and self.decode.scoring():
                    self.decode.score(layer, query, key, value, kwargs.get("scaling"))
                if attention_mask is not None and attention_mask.shape[-1] > key.shape[-2]:
                    # Mask sized for the logical length over a shrunk cache: with batch 1 and no
                    # padding, the kept prompt tokens are all visible and the newest are last.
                    attention_mask = attention_mask[..., -key.shape[-2]:]
            return attention_fn(module, query, key, value, attention_mask, *args, **kwargs)

        return attention


@contextlib.contextmanager
def _wrapped_sdpa(capture: _Capture):
    from transformers.modeling_utils import AttentionInterface

    mapping = AttentionInterface._global_mapping
    original = mapping["sdpa"]
    mapping["sdpa"] = capture.wrap(original)
    try:
        yield
    finally:
        mapping["sdpa"] = original


def held_scores(cache, queries: dict[int, torch.Tensor], scaling: dict[int, float | None], policy: EvictionPolicy,
                positions: list[torch.Tensor] | None, n: int, novelty: bool = False) -> torch.Tensor:
    """Window scores [L, H, n] of the tokens each head holds, at their logical positions (0 for
    tokens compacted away earlier; `positions`: per layer [H, held], None = all n held).
    `novelty`: each key's distance from the mean key instead (`key_novelty`; no query needed)."""
    layers = cache.layers
    scores = []
    for i, layer in enumerate(layers):
        held = layer.keys.shape[-2]
        if novelty:
            psi = key_novelty(*dense_as_paged(layer.keys[0]), held, layout="HND")
        else:
            psi = window_scores(*dense_as_paged(layer.keys[0]), queries[i], held, layout="HND", scale=scaling[i])
        if policy.value_weighted:
            psi = psi * value_norms(*dense_as_paged(layer.values[0]), held, layout="HND")
        if positions is not None:
            psi = torch.zeros(psi.shape[0], n, dtype=psi.dtype, device=psi.device).scatter_(
                1, positions[i].to(psi.device), psi)
        scores.append(psi)
    return torch.stack(scores)


def compact_cache(cache, keep: list[torch.Tensor], present: torch.Tensor | None, logical_len: int) -> None:
    """Every layer keeps, per head, the logical tokens `keep[l]` [H, K_l] (sorted), densely."""
    for i, (layer, idx) in enumerate(zip(cache.layers, keep)):
        slots = idx if present is None else physical_indices(idx, present[i])
        index = slots[None, :, :, None].expand(1, -1, -1, layer.keys.shape[-1]).to(layer.keys.device)
        _evicted_layer(layer, layer.keys.gather(2, index), layer.values.gather(2, index), logical_len)


def evict_cache(cache, queries: dict[int, torch.Tensor], scaling: dict[int, float | None], tags: torch.Tensor,
                policy: EvictionPolicy, report: EvictionReport, positions: list[torch.Tensor] | None = None) -> None:
    """Shrink every layer of a DynamicCache in place to the tokens the policy keeps of the whole
    prompt. `positions`: what earlier compactions between prefill chunks left (None: all)."""
    layers = cache.layers
    n = tags.numel()
    report.prompt_len = n
    present = held_mask(positions, n)
    if policy.needs_scores:
        keep = policy.select(held_scores(cache, queries, scaling, policy, positions, n), tags, present=present)
    else:
        keep = policy.select(None, tags, num_layers=len(layers), num_kv_heads=layers[0].keys.shape[1],
                             present=present)
    if keep is None:
        report.kept_per_layer = [layer.keys.shape[-2] for layer in layers]
        return
    compact_cache(cache, keep, present, n)
    report.kept_per_layer = [idx.shape[1] for idx in keep]
    report.keep_indices = keep


def prefill_chunks(n: int, chunk: int, window: int) -> list[int]:
    """Where the prefill chunks of an n-token prompt end when vLLM schedules it alone with a
    token budget of `chunk`: every `chunk` tokens, except that the chunk holding the proxy window
    (the last `window` tokens) is never split: the one before ends where the window starts."""
    if chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {chunk}")
    ends, start = [], 0
    while start < n:
        end = min(start + chunk, n)
        if start < n - window < end < n:
            end = n - window
        ends.append(end)
        start = end
    return ends


class PrefillEviction:
    """Compaction between prefill chunks (`policy.during_prefill`). After a chunk ending at a
    multiple of `chunk` (vLLM's fixed compaction points), a cache holding more than kept + slack
    tokens per head is compacted back to the whole prompt's kept count, each layer alike, scored
    by that chunk's own last queries ("chunk"), by the running mean of every chunk's window
    scores ("running"), by each key's distance from the mean key ("novelty"), or by the queries of
    the prompt's last `window` tokens (the question) forwarded alone ("ahead") or right after the
    chunk, over what the cache holds ("appended"), then dropped."""

    def __init__(self, policy: EvictionPolicy, tags: torch.Tensor, report: EvictionReport, chunk: int):
        self.policy, self.tags, self.report, self.chunk = policy, tags, report, chunk
        n = tags.numel()
        self.kept = policy.kept_tokens(n)
        self.limit = self.kept + policy.slack_tokens(self.kept)
        self.positions: list[torch.Tensor] | None = None  # per layer [H, held]; None: every token so far
        self.running: tuple[torch.Tensor, torch.Tensor] | None = None  # score sums and counts [L, H, n]
        # "ahead" / "appended": layer -> the queries [W, Hq, D] of the prompt's last window tokens
        self.question_queries: dict[int, torch.Tensor] = {}

    def sync(self, cache, end: int) -> list[torch.Tensor] | None:
        """Account for the tokens the chunk ending at `end` appended after the survivors; returns
        the logical positions every head holds (None: all of them)."""
        held = cache.layers[0].keys.shape[-2]
        self.report.peak_held = max(self.report.peak_held, held)
        if self.positions is not None:
            heads, survivors = self.positions[0].shape
            new = torch.arange(end - (held - survivors), end, device=self.positions[0].device).expand(heads, -1)
            self.positions = [torch.cat([p, new], dim=1) for p in self.positions]
        return self.positions

    def after_chunk(self, cache, queries, scaling, end: int, run_window: Callable) -> None:
        """`run_window(cache or None)`: forwards the prompt's last window tokens over that cache
        (None: alone) and undoes what they added; the capture then holds their queries."""
        layers = cache.layers
        self.sync(cache, end)
        held = layers[0].keys.shape[-2]
        policy, n = self.policy, self.tags.numel()
        running = policy.needs_scores and policy.prefill_scores == "running"
        due = held > self.limit and end % self.chunk == 0  # compactions only at multiples of the chunk (as vLLM)
        if not due and not running:
            return
        scores = None
        present = held_mask(self.positions, end)
        if policy.needs_scores:
            appended = policy.prefill_scores == "appended"
            question = policy.prefill_scores == "ahead" or (appended and probe_fits(
                end, n, policy.question_probe(n), lambda start, stop: bool((self.tags[start:stop] != TEXT).any())))
            if question and (appended or not self.question_queries):
                run_window(cache if appended else None)  # "ahead": once, alone
                self.question_queries = dict(queries)  # what the capture saw
            if question:  # queries after every held key: each sees them all
                queries = {layer: queries_after_every_key(q, cache.layers[0].keys.shape[1])
                           for layer, q in self.question_queries.items()}
            scores = held_scores(cache, queries, scaling, policy, self.positions, n,
                                 novelty=policy.prefill_scores == "novelty")[..., :end]
            if running:  # every chunk's window adds to the sums of the tokens it saw
                seen = torch.ones_like(scores, dtype=torch.bool) if present is None else present
                if self.running is None:
                    self.running = (scores.new_zeros(*scores.shape[:2], n), scores.new_zeros(*scores.shape[:2], n))
                sums, counts = self.running
                sums[..., :end] += scores
                counts[..., :end] += seen
                scores = sums[..., :end] / counts[..., :end].clamp(min=1)
        if not due:
            return
        tail = policy.protected_tail(self.kept)
        keep = policy.select(scores, self.tags[:end], num_layers=len(layers), num_kv_heads=layers[0].keys.shape[1],
                             budgets=[self.kept - tail] * len(layers), kept=self.kept, present=present)
        compact_cache(cache, keep, present, end)
        self.positions = keep
        self.report.prefill_compactions.append((end, keep))


class DecodeEviction:
    """Compaction during decode (`policy.decode_budget`): the `window` decode queries before each
    point (`policy.decode_point`) score every token the layer holds, each against what it sees,
    as vLLM scores them step by step; after the forward that reaches the point, every layer is
    compacted to the cap (or keeps all it holds when that is less)."""

    def __init__(self, policy: EvictionPolicy, tags: torch.Tensor, report: EvictionReport, cache,
                 survivors: list[torch.Tensor] | None):
        self.policy, self.report, self.n = policy, report, tags.numel()
        self.prompt_tags = tags
        self.cap = policy.decode_cap(self.n)
        self.survivors, self.covered = survivors, self.n  # logical positions each head holds, per layer
        self.position = self.n  # the logical position the next forward computes
        self.num_layers = len(cache.layers)
        self.scores: torch.Tensor | None = None  # [L, H, point] at logical positions
        self.point = self._next_point(cache, since=self.n)

    def _next_point(self, cache, since: int) -> int:
        logical = cache.layers[0].get_seq_length()
        evicted_min = logical - max(layer.keys.shape[-2] for layer in cache.layers)
        return self.policy.decode_point(self.n, evicted_min, since)

    def scoring(self) -> bool:
        return self.policy.needs_scores and self.point - max(self.policy.window, 1) <= self.position < self.point

    def score(self, layer: int, query, key, value, scaling) -> None:
        held = key.shape[-2]
        psi = window_scores(*dense_as_paged(key[0]), query[0].transpose(0, 1), held, layout="HND", scale=scaling)
        if self.policy.value_weighted:
            psi = psi * value_norms(*dense_as_paged(value[0]), held, layout="HND")
        if self.scores is None:
            self.scores = torch.zeros(self.num_layers, psi.shape[0], self.point, device=psi.device)
        positions = torch.arange(held, device=psi.device).expand(psi.shape[0], -1) if self.survivors is None \
            else logical_positions(self.survivors[layer].to(psi.device), self.covered, held)
        self.scores[layer].scatter_add_(1, positions, psi.float())

    def after_forward(self, cache) -> None:
        layers = cache.layers
        self.report.decode_peak_held = max(self.report.decode_peak_held, max(layer.keys.shape[-2] for layer in layers))
        self.position = layers[0].get_seq_length()
        if self.position != self.point:
            return
        point, policy = self.point, self.policy
        positions = None if self.survivors is None else [
            logical_positions(s, self.covered, layer.keys.shape[-2]) for s, layer in zip(self.survivors, layers)]
        present = held_mask(positions, point)
        tags = torch.cat([self.prompt_tags, self.prompt_tags.new_full((point - self.n,), TEXT)])
        tail = policy.protected_tail(self.cap)
        budgets = [min(self.cap, layer.keys.shape[-2]) - tail for layer in layers]
        keep = policy.select(self.scores, tags, num_layers=len(layers), num_kv_heads=layers[0].keys.shape[1],
                             budgets=budgets, kept=self.cap, present=present)
        if keep is not None:
            compact_cache(cache, keep, present, point)
            self.survivors, self.covered = keep, point
            self.report.decode_compactions.append((point, keep))
        self.scores = None
        self.point = self._next_point(cache, since=point)


def _new_report(model, input_ids: torch.Tensor) -> tuple[EvictionReport, torch.Tensor]:
    if input_ids.shape[0] != 1:
        raise ValueError("the HF reference path evicts one request at a time (batch size 1)")
    report = EvictionReport(prompt_len=input_ids.shape[1])
    tags = modality_tags(input_ids[0], model.config)
    report.modality_counts = {name: int((tags == t).sum()) for name, t in MODALITY_TAGS.items()}
    return report, tags


def _check_sdpa(model) -> None:
    text_config = model.config.get_text_config()
    if text_config._attn_implementation != "sdpa":
        raise ValueError("load the model with attn_implementation='sdpa' "
                         f"(it uses {text_config._attn_implementation!r})")


@contextlib.contextmanager
def _prefill_in_chunks(model, ends: list[int], after_chunk: Callable[[int, Callable], None] | None, window: int = 0):
    """The decoder's prefill forward (the whole prompt, embeddings already merged with the images'
    by the multimodal model) runs chunk by chunk, ending at `ends`, with `after_chunk(end,
    run_window)` between chunks: `run_window(cache)` forwards the prompt's last `window` tokens at
    their own positions over `cache` as it is (None: alone, into a throwaway cache), then drops
    the keys and values they added. Decode forwards pass through."""
    from transformers import DynamicCache

    decoder = model.get_decoder()
    forward = decoder.forward

    def chunked(input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        if inputs_embeds is None and input_ids is not None:
            inputs_embeds = decoder.get_input_embeddings()(input_ids)
        n = ends[-1]
        if inputs_embeds.shape[1] != n:  # not the prompt: a decode step
            return forward(attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds,
                           **kwargs)

        def run_window(cache) -> None:
            tail = torch.arange(n - window, n, device=inputs_embeds.device)
            held = [] if cache is None else [layer.keys.shape[-2] for layer in cache.layers]
            forward(inputs_embeds=inputs_embeds[:, n - window:], use_cache=True,
                    position_ids=tail[None] if position_ids is None else position_ids[..., n - window:],
                    past_key_values=DynamicCache(config=model.config) if cache is None else cache)
            for layer, length in zip(cache.layers if cache is not None else (), held):
                layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]

        start = 0
        for end in ends:
            # batch 1, no padding: the 2-D mask only grows; M-RoPE ids are [3 or 4, 1, n]
            output = forward(attention_mask=None if attention_mask is None else attention_mask[:, :end],
                             position_ids=None if position_ids is None else position_ids[..., start:end],
                             inputs_embeds=inputs_embeds[:, start:end], **kwargs)
            if end < ends[-1] and after_chunk is not None:
                after_chunk(end, run_window)
            start = end
        return output  # the last chunk's hidden states: what picks the first token

    decoder.forward = chunked
    try:
        yield
    finally:
        del decoder.forward


def generate_with_eviction(model, inputs: dict, policy: EvictionPolicy | None, prefill_chunk: int | None = None,
                           **generate_kwargs):
    """`model.generate(**inputs, **generate_kwargs)` with the KV cache evicted after prefill.
    `prefill_chunk`: prefill in chunks of that many tokens (as vLLM's chunked prefill); a policy
    with `during_prefill` then also evicts between chunks (and needs it).

    Returns (generate's output, EvictionReport). policy None = stock generate.
    """
    from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

    report, tags = _new_report(model, inputs["input_ids"])
    n = tags.numel()
    if policy is not None and policy.during_prefill and prefill_chunk is None:
        raise ValueError(f"{policy.name} evicts during prefill: pass prefill_chunk (tokens per chunk)")
    if prefill_chunk is not None and policy is not None and policy.during_prefill:
        prefill_chunk = policy.compaction_interval(prefill_chunk, n)  # as vLLM: a probe shares the chunk's step
    ends = None if prefill_chunk is None else prefill_chunks(
        n, prefill_chunk, policy.score_queries(n) if policy is not None and policy.needs_scores else 0)
    if policy is None:
        with _prefill_in_chunks(model, ends, None) if ends else contextlib.nullcontext():
            return model.generate(**inputs, **generate_kwargs), report
    _check_sdpa(model)

    capture = _Capture(model, lambda q_len: min(policy.score_queries(n), q_len))
    cache = DynamicCache(config=model.config)
    prefill = PrefillEviction(policy, tags, report, prefill_chunk) if policy.during_prefill else None

    def after_chunk(end: int, run_window: Callable) -> None:
        prefill.after_chunk(cache, capture.queries, capture.scaling, end, run_window)

    class _EvictAfterPrefill(LogitsProcessor):
        def __call__(self, ids, scores):
            if not capture.done:
                capture.done = True
                positions = None if prefill is None else prefill.sync(cache, n)
                evict_cache(cache, capture.queries, capture.scaling, tags.to(ids.device), policy, report, positions)
                capture.queries.clear()
                if policy.decode_budget is not None:
                    capture.decode = DecodeEviction(policy, tags.to(ids.device), report, cache,
                                                    report.keep_indices or positions)
            elif capture.decode is not None:
                capture.decode.after_forward(cache)
            return scores

    processors = LogitsProcessorList(generate_kwargs.pop("logits_processor", []) or [])
    processors.insert(0, _EvictAfterPrefill())
    chunks = contextlib.nullcontext() if not ends else _prefill_in_chunks(
        model, ends, after_chunk if prefill else None, window=policy.score_queries(n))
    with _wrapped_sdpa(capture), chunks:
        out = model.generate(**inputs, past_key_values=cache, logits_processor=processors, **generate_kwargs)
    return out, report


def generate_sweep(model, inputs: dict, policies: Mapping[str, EvictionPolicy | None], max_new_tokens: int,
                   prefill_chunk: int | None = None):
    """Greedy outputs of many policies after one shared prefill: {name: (ids, EvictionReport)}.

    Each policy evicts its own copy of the full prompt cache, then `generate` continues from
    the prefill's greedy token, so the ids equal `generate_with_eviction(..., do_sample=False)`
    (the tests check it). Only the prompt is re-used, so the models that keep positions in the
    cache's length (LLaVA, Qwen2-VL's cached rope deltas) are the ones this supports. Policies
    that evict during prefill shape their own prefill: each runs alone, in `prefill_chunk` chunks;
    so does each policy that evicts during decode.
    """
    from transformers import DynamicCache

    _check_sdpa(model)
    alone = {name: p for name, p in policies.items()
             if p is not None and (p.during_prefill or p.decode_budget is not None)}
    results = {name: generate_with_eviction(model, inputs, p, prefill_chunk=prefill_chunk,
                                            max_new_tokens=max_new_tokens, do_sample=False)
               for name, p in alone.items()}
    policies = {name: p for name, p in policies.items() if name not in alone}
    if not policies:
        return results
    input_ids = inputs["input_ids"]
    _, tags = _new_report(model, input_ids)
    n = input_ids.shape[1]
    active = [p for p in policies.values() if p is not None]
    widest = max((p.score_queries(n) for p in active), default=1)
    capture = _Capture(model, lambda q_len: min(widest, q_len))
    prompt_cache = DynamicCache(config=model.config)
    with _wrapped_sdpa(capture), torch.no_grad():
        logits = model(**inputs, past_key_values=prompt_cache, use_cache=True).logits[:, -1]
    capture.done = True
    first = logits.argmax(dim=-1, keepdim=True)
    ids = torch.cat([input_ids, first], dim=1)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    for name, policy in policies.items():
        report, _ = _new_report(model, input_ids)
        cache = copy.deepcopy(prompt_cache)
        if policy is not None:
            w = policy.score_queries(n)
            queries = {layer: q[-w:] for layer, q in capture.queries.items()}
            evict_cache(cache, queries, capture.scaling, tags.to(input_ids.device), policy, report)
        if max_new_tokens <= 1 or int(first) in eos:
            results[name] = (ids, report)
            continue
        with _wrapped_sdpa(capture):
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                                 max_new_tokens=max_new_tokens - 1, do_sample=False)
        results[name] = (out, report)
    return results
