"""madakv_kernels: paged KV scoring and compaction (Triton + torch references). No vLLM here.

`window_scores` and `compact_kv` dispatch to Triton for CUDA tensors and to the torch reference
otherwise (set MADAKV_FORCE_TRITON=1 with TRITON_INTERPRET=1 to run the Triton path on CPU).
"""
from __future__ import annotations

import os

import torch

from ._paged import dense_as_paged, gather_tokens, paged_dims
from ._triton import HAS_TRITON
from .compaction import compact_kv_torch, compact_kv_triton
from .scoring import key_novelty, queries_after_every_key, value_norms, window_scores_torch, window_scores_triton
from .selection import (
    IMAGE,
    MODALITY_TAGS,
    TEXT,
    VIDEO,
    coverage_demand,
    firsts,
    held_mask,
    in_positions,
    keep_indices,
    listed,
    logical_positions,
    modality_mass,
    physical_indices,
    rank_order,
    span_ranks,
    split_quota,
    topk_mask,
)


def _use_triton(tensor: torch.Tensor) -> bool:
    return HAS_TRITON and (tensor.is_cuda or os.environ.get("MADAKV_FORCE_TRITON") == "1")


def window_scores(key_cache, block_table, queries, context_len, layout="NHD", scale=None) -> torch.Tensor:
    impl = window_scores_triton if _use_triton(key_cache) else window_scores_torch
    return impl(key_cache, block_table, queries, context_len, layout=layout, scale=scale)


def compact_kv(key_cache, value_cache, src_block_table, dst_block_table, keep_idx, layout="NHD") -> None:
    impl = compact_kv_triton if _use_triton(key_cache) else compact_kv_torch
    impl(key_cache, value_cache, src_block_table, dst_block_table, keep_idx, layout=layout)


__all__ = [
    "TEXT", "IMAGE", "VIDEO", "MODALITY_TAGS", "HAS_TRITON",
    "window_scores", "window_scores_torch", "window_scores_triton", "queries_after_every_key", "value_norms",
    "key_novelty",
    "compact_kv", "compact_kv_torch", "compact_kv_triton",
    "modality_mass", "coverage_demand", "topk_mask", "rank_order", "listed", "firsts", "in_positions",
    "span_ranks", "split_quota", "keep_indices", "held_mask",
    "physical_indices", "logical_positions",
    "dense_as_paged", "gather_tokens", "paged_dims",
]
