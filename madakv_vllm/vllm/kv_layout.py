"""Where one layer's keys and values live inside vLLM's paged KV cache, per attention backend,
a start-up probe that checks it against the backend's own cache writer, and the split of the
layers into KV-cache groups (buckets)."""
from __future__ import annotations

import torch

from madakv_kernels import gather_tokens, paged_dims


def key_value_views(kv_cache: torch.Tensor, impl) -> tuple[torch.Tensor, torch.Tensor, str]:
    """One layer's paged keys and values as 4-D strided views [blocks, kv_heads, block_size,
    head_dim] ("HND") or [blocks, block_size, kv_heads, head_dim] ("NHD")."""
    if type(impl).__name__ == "CPUAttentionBackendImpl":
        # [blocks, kv_heads, block_size, 2 * head_dim]; per (block, head) the CPU kernels store
        # the keys transposed (head_dim x block_size), then the values token by token.
        blocks, heads, block_size, twice_dim = kv_cache.shape
        head_dim = twice_dim // 2
        if kv_cache.stride()[2:] != (twice_dim, 1):
            raise RuntimeError("KV eviction expects each CPU KV block to be contiguous, "
                               f"got strides {kv_cache.stride()}")
        size, (s_block, s_head) = (blocks, heads, block_size, head_dim), kv_cache.stride()[:2]
        offset = kv_cache.storage_offset()
        keys = kv_cache.as_strided(size, (s_block, s_head, 1, block_size), offset)
        values = kv_cache.as_strided(size, (s_block, s_head, head_dim, 1), offset + block_size * head_dim)
        return keys, values, "HND"
    if kv_cache.dim() == 4:  # GPU backends: a strided (blocks, kv_heads, block_size, 2 * head_dim) view, K | V
        keys, values = kv_cache.transpose(1, 2).split(kv_cache.shape[-1] // 2, dim=-1)
        return keys, values, "NHD"
    raise RuntimeError(f"KV eviction does not know the KV-cache layout of {type(impl).__name__} "
                       f"(shape {tuple(kv_cache.shape)})")


def check_layout(layer, impl, kv_cache: torch.Tensor) -> None:
    """Write known keys and values through the backend's own cache update into a scratch cache
    shaped like the real one, and read them back through key_value_views: the backend's private
    layout (it may differ by CPU ISA) must be the one we assume, or we refuse to start."""
    scratch = torch.zeros((2,) + tuple(kv_cache.shape[1:]), dtype=kv_cache.dtype, device=kv_cache.device)
    keys, values, layout = key_value_views(scratch, impl)
    block_size, heads, head_dim = paged_dims(keys, layout)
    num_tokens = 2 * block_size
    ramp = torch.arange(num_tokens * heads * head_dim, device=kv_cache.device).reshape(num_tokens, heads, head_dim)
    key = (ramp % 251).to(kv_cache.dtype)
    value = (ramp % 241 + 300).to(kv_cache.dtype)
    impl.do_kv_cache_update(layer, key, value, scratch, torch.arange(num_tokens, device=kv_cache.device))
    table = torch.tensor([0, 1], dtype=torch.int32, device=kv_cache.device)
    positions = torch.arange(num_tokens, device=kv_cache.device)
    if not (torch.equal(gather_tokens(keys, table, positions, layout), key)
            and torch.equal(gather_tokens(values, table, positions, layout), value)):
        raise RuntimeError(f"KV eviction does not support the KV-cache layout of {type(impl).__name__} here "
                           f"(ISA {getattr(layer, 'isa', '?')}, dtype {kv_cache.dtype}); run with --kv-eviction none")


def split_into_buckets(groups: list, count: int) -> list:
    """vLLM's one full-attention KV-cache group as `count` groups of consecutive layers (equal
    sizes: a block costs the largest group's layers, vLLM would pad smaller ones)."""
    from vllm.model_executor.models.utils import extract_layer_index
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec

    from .compat import EvictionStartupError

    if len(groups) != 1 or type(groups[0].kv_cache_spec) is not FullAttentionSpec:
        raise EvictionStartupError(f"--kv-eviction-layer-groups {count} needs one full-attention KV-cache group, this "
                                   f"model has {[type(g.kv_cache_spec).__name__ for g in groups]}")
    names = sorted(groups[0].layer_names, key=extract_layer_index)
    size, rest = divmod(len(names), count)
    if rest:
        raise EvictionStartupError(f"--kv-eviction-layer-groups {count}: {len(names)} attention layers do not split "
                                   f"into equal buckets")
    spec = groups[0].kv_cache_spec
    return [KVCacheGroupSpec(names[i * size:(i + 1) * size], spec) for i in range(count)]
