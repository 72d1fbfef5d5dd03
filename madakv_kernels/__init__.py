"""madakv_kernels: paged KV scoring and compaction (Triton + torch references). No vLLM here.

`window_scores` and `compact_kv` dispatch to Triton for CUDA tensors and to the torch reference
otherwise (set MADAKV_FORCE_TRITON=1 with TRITON_INTERPRET=1 to run the Triton path on CPU).
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch

from ._paged import LAYOUTS, dense_as_paged, gather_tokens
from .compaction import compact_kv_torch, compact_kv_triton
from .compaction import HAS_TRITON
from .scoring import window_scores_torch, window_scores_triton
from .selection import IMAGE, TEXT, VIDEO, coverage_demand, keep_indices, modality_mass, split_quota, topk_mask


def use_triton(tensor: torch.Tensor) -> bool:
    if not HAS_TRITON:
        return False
    return tensor.is_cuda or os.environ.get("MADAKV_FORCE_TRITON") == "1"


def window_scores(key_cache, block_table, queries, context_len, layout="NHD", scale=None) -> torch.Tensor:
    impl = window_scores_triton if use_triton(key_cache) else window_scores_torch
    return impl(key_cache, block_table, queries, context_len, layout=layout, scale=scale)


class LayerScores(NamedTuple):
    psi: torch.Tensor  # [Hkv, N] float32 proxy-window attention per token
    modality_mass: torch.Tensor  # [Hkv, 3] mass on text / image / video tokens before the window


def score_layer(key_cache, block_table, queries, context_len, modality_tags, layout="NHD", scale=None) -> LayerScores:
    """One layer's window scores plus each head's attention mass per modality (tags: 0 text,
    1 image, 2 video), the statistics MadaKV's MPA splits budgets by."""
    psi = window_scores(key_cache, block_table, queries, context_len, layout=layout, scale=scale)
    n_select = context_len - min(queries.shape[0], context_len)
    return LayerScores(psi, modality_mass(psi, modality_tags, n_select))


def compact_kv(key_cache, value_cache, src_block_table, dst_block_table, keep_idx, layout="NHD") -> None:
    impl = compact_kv_triton if use_triton(key_cache) else compact_kv_torch
    impl(key_cache, value_cache, src_block_table, dst_block_table, keep_idx, layout=layout)


__all__ = [
    "LAYOUTS", "TEXT", "IMAGE", "VIDEO", "HAS_TRITON",
    "LayerScores", "score_layer", "window_scores", "window_scores_torch", "window_scores_triton",
    "compact_kv", "compact_kv_torch", "compact_kv_triton",
    "modality_mass", "coverage_demand", "topk_mask", "split_quota", "keep_indices",
    "dense_as_paged", "gather_tokens", "use_triton",
]
