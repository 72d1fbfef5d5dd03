"""Paged KV-cache layouts shared by the kernels and their torch references.

vLLM 0.32 stores one layer's keys (and values) per physical block; backends differ only in the
order of the two middle axes, so every kernel reads the cache through its strides:
  "NHD": [num_blocks, block_size, num_kv_heads, head_dim]  (FlashAttention / Triton backends)
  "HND": [num_blocks, num_kv_heads, block_size, head_dim]  (CPU attention backend)
"""
from __future__ import annotations

import torch

LAYOUTS = ("NHD", "HND")


def paged_strides(cache: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    """(block, token-in-block, head, dim) strides of a 4-D paged cache view."""
    if cache.dim() != 4:
        raise ValueError(f"paged cache must be 4-D, got shape {tuple(cache.shape)}")
    if layout == "NHD":
        s = cache.stride()
        return s[0], s[1], s[2], s[3]
    if layout == "HND":
        s = cache.stride()
        return s[0], s[2], s[1], s[3]
    raise ValueError(f"unknown paged layout {layout!r}; expected one of {LAYOUTS}")


def paged_dims(cache: torch.Tensor, layout: str) -> tuple[int, int, int]:
    """(block_size, num_kv_heads, head_dim) of a paged cache."""
    paged_strides(cache, layout)  # validates
    if layout == "NHD":
        return cache.shape[1], cache.shape[2], cache.shape[3]
    return cache.shape[2], cache.shape[1], cache.shape[3]


def as_token_major(cache: torch.Tensor, layout: str) -> torch.Tensor:
    """View the cache as [num_blocks, block_size, num_kv_heads, head_dim] whatever its layout."""
    paged_strides(cache, layout)
    return cache if layout == "NHD" else cache.transpose(1, 2)


def gather_tokens(cache: torch.Tensor, block_table: torch.Tensor, token_idx: torch.Tensor, layout: str) -> torch.Tensor:
    """Tokens at logical positions `token_idx` ([...]) of one request: [..., num_kv_heads, head_dim]."""
    nhd = as_token_major(cache, layout)
    block_size = nhd.shape[1]
    blocks = block_table.long()[token_idx // block_size]
    return nhd[blocks, token_idx % block_size]


def request_keys(cache: torch.Tensor, block_table: torch.Tensor, n: int, layout: str) -> torch.Tensor:
    """The first n tokens of one request as a dense [num_kv_heads, n, head_dim] copy (whole-block gathers)."""
    block_size, num_kv_heads, head_dim = paged_dims(cache, layout)
    blocks = cache[block_table[: -(-n // block_size)].long()]
    if layout == "NHD":  # [nb, bs, H, D]
        return blocks.reshape(-1, num_kv_heads, head_dim)[:n].transpose(0, 1)
    return blocks.transpose(0, 1).reshape(num_kv_heads, -1, head_dim)[:, :n]  # from [nb, H, bs, D]


def dense_as_paged(kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense per-request cache [num_kv_heads, n, head_dim] seen as one "HND" block of n tokens.

    Lets the HF reference path use the same scoring code as the paged vLLM path, without a copy.
    """
    cache = kv.unsqueeze(0)  # [1, H, n, D] == HND with block_size n
    block_table = torch.zeros(1, dtype=torch.int32, device=kv.device)
    return cache, block_table
