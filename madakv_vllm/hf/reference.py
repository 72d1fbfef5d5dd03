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

`generate_sweep` gives the same tokens for many policies at the cost of one prefill (each
policy evicts its own copy of the full cache): what the ablation benchmark uses.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from madakv_kernels import IMAGE, MODALITY_TAGS, TEXT, VIDEO, dense_as_paged, value_norms, window_scores

from ..policies import EvictionPolicy


@dataclass
class EvictionReport:
    """What eviction did to one request: prompt length and tokens kept per layer (per head)."""

    prompt_len: int = 0
    kept_per_layer: list[int] = field(default_factory=list)
    modality_counts: dict[str, int] = field(default_factory=dict)
    keep_indices: list[torch.Tensor] | None = None  # per layer [H, K_l]; None = nothing evicted

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

    def wrap(self, attention_fn):
        def attention(module, query, key, value, attention_mask, *args, **kwargs):
            layer = self.layer_of.get(id(module))
            if layer is not None:
                if not self.done and query.shape[2] > 1:  # the prefill forward
                    w = self.window(query.shape[2])
                    self.queries[layer] = query[0, :, -w:].transpose(0, 1).detach()
                    self.scaling[layer] = kwargs.get("scaling")
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


def evict_cache(cache, queries: dict[int, torch.Tensor], scaling: dict[int, float | None], tags: torch.Tensor,
                policy: EvictionPolicy, report: EvictionReport) -> None:
    """Shrink every layer of a DynamicCache in place to the tokens the policy keeps."""
    layers = cache.layers
    n = layers[0].keys.shape[-2]
    report.prompt_len = n
    if policy.needs_scores:
        scores = torch.stack([
            window_scores(*dense_as_paged(layer.keys[0]), queries[i], n, layout="HND", scale=scaling[i])
            for i, layer in enumerate(layers)])
        if policy.value_weighted:
            scores *= torch.stack([value_norms(*dense_as_paged(layer.values[0]), n, layout="HND") for layer in layers])
        keep = policy.select(scores, tags)
    else:
        keep = policy.select(None, tags, num_layers=len(layers), num_kv_heads=layers[0].keys.shape[1])
    if keep is None:
        report.kept_per_layer = [n] * len(layers)
        return
    for layer, idx in zip(layers, keep):
        index = idx[None, :, :, None].expand(1, -1, -1, layer.keys.shape[-1]).to(layer.keys.device)
        _evicted_layer(layer, layer.keys.gather(2, index), layer.values.gather(2, index), n)
    report.kept_per_layer = [idx.shape[1] for idx in keep]
    report.keep_indices = keep


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


def generate_with_eviction(model, inputs: dict, policy: EvictionPolicy | None, **generate_kwargs):
    """`model.generate(**inputs, **generate_kwargs)` with the KV cache evicted after prefill.

    Returns (generate's output, EvictionReport). policy None = stock generate.
    """
    from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

    report, tags = _new_report(model, inputs["input_ids"])
    if policy is None:
        return model.generate(**inputs, **generate_kwargs), report
    _check_sdpa(model)

    capture = _Capture(model, policy.score_queries)
    cache = DynamicCache(config=model.config)

    class _EvictAfterPrefill(LogitsProcessor):
        def __call__(self, ids, scores):
            if not capture.done:
                capture.done = True
                evict_cache(cache, capture.queries, capture.scaling, tags.to(ids.device), policy, report)
                capture.queries.clear()
            return scores

    processors = LogitsProcessorList(generate_kwargs.pop("logits_processor", []) or [])
    processors.insert(0, _EvictAfterPrefill())
    with _wrapped_sdpa(capture):
        out = model.generate(**inputs, past_key_values=cache, logits_processor=processors, **generate_kwargs)
    return out, report


def generate_sweep(model, inputs: dict, policies: Mapping[str, EvictionPolicy | None], max_new_tokens: int):
    """Greedy outputs of many policies after one shared prefill: {name: (ids, EvictionReport)}.

    Each policy evicts its own copy of the full prompt cache, then `generate` continues from
    the prefill's greedy token, so the ids equal `generate_with_eviction(..., do_sample=False)`
    (the tests check it). Only the prompt is re-used, so the models that keep positions in the
    cache's length (LLaVA, Qwen2-VL's cached rope deltas) are the ones this supports.
    """
    from transformers import DynamicCache

    _check_sdpa(model)
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
    results = {}
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
