"""Copy-on-compact of one request's kept tokens into fresh paged blocks.

For every KV head h and slot j < K: destination slot j of head h (logical slot j of the
destination block table) receives the key and value of source token keep_idx[h, j]. Heads keep
different tokens but the same count, so one destination block table serves all heads. Source and
destination blocks must be distinct: programs read sources while others write destinations.
Both implementations work in place on the caches and share one signature.
"""
from __future__ import annotations

import torch

from ._paged import as_token_major, paged_dims, paged_strides
from ._triton import HAS_TRITON, tl, triton


def _check_inputs(key_cache, value_cache, src_block_table, dst_block_table, keep_idx, layout):
    if key_cache.shape != value_cache.shape:
        raise ValueError("key and value caches must have the same shape")
    block_size, num_kv_heads, _ = paged_dims(key_cache, layout)
    if keep_idx.dim() != 2 or keep_idx.shape[0] != num_kv_heads:
        raise ValueError(f"keep_idx must be [{num_kv_heads}, K], got {tuple(keep_idx.shape)}")
    if dst_block_table.numel() * block_size < keep_idx.shape[1]:
        raise ValueError(f"{dst_block_table.numel()} destination blocks cannot hold {keep_idx.shape[1]} tokens")
    return block_size, num_kv_heads


def compact_kv_torch(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    src_block_table: torch.Tensor,
    dst_block_table: torch.Tensor,
    keep_idx: torch.Tensor,
    layout: str = "NHD",
) -> None:
    block_size, num_kv_heads = _check_inputs(key_cache, value_cache, src_block_table, dst_block_table, keep_idx, layout)
    kept = keep_idx.shape[1]
    src_tok = keep_idx.long()  # [H, K]
    src_blk = src_block_table.long()[src_tok // block_size]
    dst_slot = torch.arange(kept, device=keep_idx.device)
    dst_blk = dst_block_table.long()[dst_slot // block_size].expand(num_kv_heads, kept)
    dst_off = (dst_slot % block_size).expand(num_kv_heads, kept)
    heads = torch.arange(num_kv_heads, device=keep_idx.device)[:, None].expand(num_kv_heads, kept)
    for cache in (key_cache, value_cache):
        nhd = as_token_major(cache, layout)
        nhd[dst_blk, dst_off, heads] = nhd[src_blk, src_tok % block_size, heads]


if HAS_TRITON:

    @triton.jit
    def _compact_kernel(
        k_ptr, v_ptr, src_bt_ptr, dst_bt_ptr, keep_ptr,
        KEPT, s_keep_h,
        sk_b, sk_t, sk_h, sk_d,
        sv_b, sv_t, sv_h, sv_d,
        BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # One program owns BLOCK_T destination slots of one KV head (keys and values).
        head = tl.program_id(0)
        offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)
        valid = offs_t < KEPT
        src_tok = tl.load(keep_ptr + head * s_keep_h + offs_t, mask=valid, other=0).to(tl.int64)
        src_blk = tl.load(src_bt_ptr + src_tok // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        dst_blk = tl.load(dst_bt_ptr + offs_t // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        mask = valid[:, None] & (offs_d[None, :] < HEAD_DIM)
        src_t, dst_t = (src_tok % BLOCK_SIZE)[:, None], (offs_t % BLOCK_SIZE)[:, None]
        k_src = src_blk[:, None] * sk_b + src_t * sk_t + head * sk_h + offs_d[None, :] * sk_d
        k_dst = dst_blk[:, None] * sk_b + dst_t * sk_t + head * sk_h + offs_d[None, :] * sk_d
        v_src = src_blk[:, None] * sv_b + src_t * sv_t + head * sv_h + offs_d[None, :] * sv_d
        v_dst = dst_blk[:, None] * sv_b + dst_t * sv_t + head * sv_h + offs_d[None, :] * sv_d
        k = tl.load(k_ptr + k_src, mask=mask).to(tl.float32)  # fp32 round trip: exact, and bf16-safe
        v = tl.load(v_ptr + v_src, mask=mask).to(tl.float32)
        tl.store(k_ptr + k_dst, k.to(k_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + v_dst, v.to(v_ptr.dtype.element_ty), mask=mask)


def compact_kv_triton(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    src_block_table: torch.Tensor,
    dst_block_table: torch.Tensor,
    keep_idx: torch.Tensor,
    layout: str = "NHD",
    block_t: int = 64,
    num_warps: int = 4,
) -> None:
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use compact_kv_torch")
    block_size, num_kv_heads = _check_inputs(key_cache, value_cache, src_block_table, dst_block_table, keep_idx, layout)
    head_dim = key_cache.shape[-1]
    keep_idx = keep_idx.contiguous()
    kept = keep_idx.shape[1]
    if kept == 0:
        return
    grid = (num_kv_heads, triton.cdiv(kept, block_t))
    _compact_kernel[grid](
        key_cache, value_cache, src_block_table.contiguous(), dst_block_table.contiguous(), keep_idx,
        kept, keep_idx.stride(0), *paged_strides(key_cache, layout), *paged_strides(value_cache, layout),
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BLOCK_T=block_t,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), num_warps=num_warps,
    )
