"""Proxy-window attention scores over one request's paged keys.

For KV head h and cached token i:
    psi[h, i] = sum over query heads q of h's GQA group, over window queries j:
                softmax_i(q_j . k_i * scale)   with causal masking (key i <= position of j)
Window query j (of W) sits at logical position N - W + j. Queries at negative positions (the
window is longer than the prompt) are ignored, so callers can always pass a fixed-size window.

Two implementations with one signature: `window_scores_torch` (CPU path and test oracle) and
`window_scores_triton`. Both return float32 [num_kv_heads, N].
"""
from __future__ import annotations

import functools
import os

import torch

from ._paged import paged_dims, paged_strides, request_keys
from ._triton import HAS_TRITON, tl, triton


def _check_inputs(key_cache, block_table, queries, context_len, layout):
    block_size, num_kv_heads, head_dim = paged_dims(key_cache, layout)
    if queries.dim() != 3 or queries.shape[2] != head_dim:
        raise ValueError(f"queries must be [W, num_q_heads, {head_dim}], got {tuple(queries.shape)}")
    if queries.shape[1] % num_kv_heads:
        raise ValueError(f"{queries.shape[1]} query heads is not a multiple of {num_kv_heads} KV heads")
    if context_len < 1 or block_table.numel() * block_size < context_len:
        raise ValueError(f"block table of {block_table.numel()} blocks x {block_size} cannot hold {context_len} tokens")
    return num_kv_heads, head_dim


def window_scores_torch(
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    queries: torch.Tensor,
    context_len: int,
    layout: str = "NHD",
    scale: float | None = None,
    max_chunk_elements: int = 1 << 25,
) -> torch.Tensor:
    num_kv_heads, head_dim = _check_inputs(key_cache, block_table, queries, context_len, layout)
    scale = head_dim**-0.5 if scale is None else scale
    n, w = context_len, queries.shape[0]
    group = queries.shape[1] // num_kv_heads
    keys = request_keys(key_cache, block_table, n, layout).float()  # [Hkv, N, D]
    keys_t = keys.transpose(1, 2)  # [Hkv, D, N]
    q = queries.float().view(w, num_kv_heads, group, head_dim).permute(1, 0, 2, 3)  # [Hkv, W, G, D]
    positions = torch.arange(n, device=queries.device)
    psi = torch.zeros(num_kv_heads, n, dtype=torch.float32, device=queries.device)
    # Row softmaxes are independent, so chunking the window bounds memory at ~max_chunk_elements.
    chunk = max(1, max_chunk_elements // max(1, num_kv_heads * group * n))
    for start in range(0, w, chunk):
        q_chunk = q[:, start : start + chunk]
        rows = q_chunk.shape[1]
        logits = torch.bmm(q_chunk.reshape(num_kv_heads, rows * group, head_dim), keys_t).mul_(scale)
        q_pos = n - w + start + torch.arange(rows, device=queries.device).repeat_interleave(group)
        hidden = positions[None, :] > q_pos[:, None]  # causal; rows with q_pos < 0 see nothing
        probs = torch.softmax(logits.masked_fill_(hidden, float("-inf")), dim=-1).nan_to_num_(0.0)
        psi += probs.sum(dim=1)
    return psi


def queries_after_every_key(queries: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Queries [W, Hq, D] that follow every scored key (a question's window run after a chunk)
    as one query position with W times the heads per KV head: `window_scores` then lets each of
    them see every key (its causal mask places them at the last W keys otherwise) and still sums
    their attention per KV head."""
    w, num_q_heads, head_dim = queries.shape
    per_kv_head = queries.reshape(w, num_kv_heads, num_q_heads // num_kv_heads, head_dim).transpose(0, 1)
    return per_kv_head.reshape(1, -1, head_dim)


def value_norms(value_cache: torch.Tensor, block_table: torch.Tensor, context_len: int,
                layout: str = "NHD") -> torch.Tensor:
    """L2 norm of each of the first `context_len` values of one request per KV head: [Hkv, N]
    fp32. A token's share of a head's output is its attention times its value, so multiplying
    the window scores by these ranks tokens by what they add (CriticalKV's observation). One
    read of the request's values; torch on every device (a reduction, no kernel needed)."""
    return request_keys(value_cache, block_table, context_len, layout).float().norm(dim=-1)


def key_novelty(key_cache: torch.Tensor, block_table: torch.Tensor, context_len: int,
                layout: str = "NHD") -> torch.Tensor:
    """How unlike the rest each of the first `context_len` keys of one request is, per KV head:
    1 - cosine(key, the mean of the keys), [Hkv, N] fp32, normalised to sum 1 per head. A score
    that needs no query (KeyDiff's observation: keys far from the mean are the ones attention
    singles out), for compactions before the question is prefilled. Torch on every device."""
    keys = request_keys(key_cache, block_table, context_len, layout).float()  # [Hkv, N, D]
    mean = keys.mean(dim=1, keepdim=True)
    novelty = 1 - torch.nn.functional.cosine_similarity(keys, mean, dim=-1)  # in [0, 2]
    return novelty / novelty.sum(dim=1, keepdim=True).clamp(min=1e-30)


if HAS_TRITON:
    _LOG2E = 1.4426950408889634

    # Rows: window query j of query head g (inside a KV head's GQA group) is row r = j * GROUP + g,
    # so rows are ordered by position. Both passes run on one grid (KV head, row block, key slice):
    # a program holds its rows' queries in registers and streams its slice of keys once, which
    # fills the GPU at long contexts without re-reading the queries per key tile.

    @triton.jit
    def _load_rows(q_ptr, offs_r, kv_head, offs_d, W, GROUP, s_qw, s_qh, s_qd,
                   HEAD_DIM: tl.constexpr, NATIVE: tl.constexpr):
        w = offs_r // GROUP
        q_head = kv_head * GROUP + offs_r % GROUP
        q = tl.load(q_ptr + w[:, None] * s_qw + q_head[:, None] * s_qh + offs_d[None, :] * s_qd,
                    mask=(offs_r[:, None] < GROUP * W) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        return q if NATIVE else q.to(tl.float32)  # fp32 off the tensor cores (and bf16-safe in the interpreter)

    @triton.jit
    def _load_keys(k_ptr, bt_ptr, offs_n, offs_d, end, kv_head, s_kb, s_kt, s_kh, s_kd,
                   BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, NATIVE: tl.constexpr):
        # Keys of logical tokens offs_n (< end), found through the request's block table.
        blk = tl.load(bt_ptr + offs_n // BLOCK_SIZE, mask=offs_n < end, other=0).to(tl.int64)
        ptrs = (k_ptr + blk[:, None] * s_kb + (offs_n % BLOCK_SIZE)[:, None] * s_kt + kv_head * s_kh
                + offs_d[None, :] * s_kd)
        k = tl.load(ptrs, mask=(offs_n[:, None] < end) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        return k if NATIVE else k.to(tl.float32)

    @triton.jit
    def _dot(a, b, NATIVE: tl.constexpr):
        # 16-bit products are exact in fp32, so the NATIVE tensor-core dot (fp32 accumulation) is as
        # exact as the fp32 "ieee" one up to summation order.
        if NATIVE:
            return tl.dot(a, b)
        return tl.dot(a, b, input_precision="ieee")

    @triton.jit
    def _window_partial_lse_kernel(
        q_ptr, k_ptr, bt_ptr, m_ptr, l_ptr,
        N, W, GROUP, CHUNK_N, scale_log2,
        s_qw, s_qh, s_qd,
        s_kb, s_kt, s_kh, s_kd,
        BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, NATIVE: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # Pass 1: each row's running max and sum of exp2 over this program's key slice.
        kv_head = tl.program_id(0)
        offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        chunk = tl.program_id(2)
        offs_d = tl.arange(0, BLOCK_D)
        q = _load_rows(q_ptr, offs_r, kv_head, offs_d, W, GROUP, s_qw, s_qh, s_qd, HEAD_DIM, NATIVE)
        q_pos = tl.where(offs_r < GROUP * W, N - W + offs_r // GROUP, -1)  # padding rows see no key
        m_i = tl.full([BLOCK_R], -1.0e30, tl.float32)  # finite, so fully masked tiles give exp2(-inf) = 0
        l_i = tl.zeros([BLOCK_R], tl.float32)
        lo = chunk * CHUNK_N
        hi = tl.minimum(lo + CHUNK_N, N)
        for n_start in range(lo, hi, BLOCK_N):
            offs_n = n_start + tl.arange(0, BLOCK_N)
            k = _load_keys(k_ptr, bt_ptr, offs_n, offs_d, hi, kv_head, s_kb, s_kt, s_kh, s_kd, BLOCK_SIZE, HEAD_DIM,
                           NATIVE)
            visible = (offs_n[None, :] <= q_pos[:, None]) & (offs_n[None, :] < hi)
            s = tl.where(visible, _dot(q, tl.trans(k), NATIVE) * scale_log2, float("-inf"))  # [rows, keys], base 2
            m_new = tl.maximum(m_i, tl.max(s, 1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
            m_i = m_new
        out = (chunk * tl.num_programs(0) + kv_head) * GROUP * W + offs_r
        tl.store(m_ptr + out, m_i, mask=offs_r < GROUP * W)
        tl.store(l_ptr + out, l_i, mask=offs_r < GROUP * W)

    @triton.jit
    def _window_psi_kernel(
        q_ptr, k_ptr, bt_ptr, m_ptr, l_ptr, psi_ptr,
        N, W, GROUP, CHUNK_N, NUM_CHUNKS, scale_log2,
        s_qw, s_qh, s_qd,
        s_kb, s_kt, s_kh, s_kd,
        BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, NATIVE: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # Pass 2: normalised probabilities summed over this program's rows, per key of its slice,
        # into psi_ptr[row block, KV head, N] (the row blocks are summed afterwards). Computed as
        # [keys, rows] so the sum over rows stays inside a warp (no shared-memory reduction).
        kv_head = tl.program_id(0)
        row_block = tl.program_id(1)
        offs_r = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
        chunk = tl.program_id(2)
        offs_d = tl.arange(0, BLOCK_D)
        q_t = tl.trans(_load_rows(q_ptr, offs_r, kv_head, offs_d, W, GROUP, s_qw, s_qh, s_qd, HEAD_DIM, NATIVE))
        q_pos = tl.where(offs_r < GROUP * W, N - W + offs_r // GROUP, -1)
        # Merge pass 1's (max, sum) pairs of these rows over all key slices into log2-sum-exp2
        # (here rather than in torch: fewer launches, which dominate below ~32K tokens).
        m_i = tl.full([BLOCK_R], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)
        for c in range(0, NUM_CHUNKS):
            part = (c * tl.num_programs(0) + kv_head) * GROUP * W + offs_r
            m_c = tl.load(m_ptr + part, mask=offs_r < GROUP * W, other=-1.0e30)
            l_c = tl.load(l_ptr + part, mask=offs_r < GROUP * W, other=0.0)
            m_new = tl.maximum(m_i, m_c)
            l_i = l_i * tl.exp2(m_i - m_new) + l_c * tl.exp2(m_c - m_new)
            m_i = m_new
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), 0.0)  # rows that see no key: 0
        lo = chunk * CHUNK_N
        hi = tl.minimum(lo + CHUNK_N, N)
        # Causality: keys after this row block's last query position get nothing from it (left 0).
        last_pos = N - W + (tl.minimum((row_block + 1) * BLOCK_R, GROUP * W) - 1) // GROUP + 1  # exclusive
        out = psi_ptr + (row_block * tl.num_programs(0) + kv_head) * N
        for n_start in range(lo, tl.minimum(hi, last_pos), BLOCK_N):
            offs_n = n_start + tl.arange(0, BLOCK_N)
            k = _load_keys(k_ptr, bt_ptr, offs_n, offs_d, hi, kv_head, s_kb, s_kt, s_kh, s_kd, BLOCK_SIZE, HEAD_DIM,
                           NATIVE)
            visible = (offs_n[:, None] <= q_pos[None, :]) & (offs_n[:, None] < hi)
            s = tl.where(visible, _dot(k, q_t, NATIVE) * scale_log2, float("-inf"))  # [keys, rows]
            tl.store(out + offs_n, tl.sum(tl.exp2(s - lse[None, :]), 1), mask=offs_n < hi)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    """Multiprocessors of a GPU, asked once (this runs for every layer of every scored step)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def _uses_native_dot(key_cache: torch.Tensor, queries: torch.Tensor) -> bool:
    """Tensor-core dots on 16-bit inputs on a GPU; fp32 "ieee" dots otherwise (the interpreter
    computes 16-bit dots wrongly, and tl.dot needs both operands in one dtype)."""
    return (key_cache.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"
            and key_cache.dtype == queries.dtype and key_cache.dtype in (torch.float16, torch.bfloat16))


def window_scores_triton(
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    queries: torch.Tensor,
    context_len: int,
    layout: str = "NHD",
    scale: float | None = None,
    block_r: int = 128,  # tile defaults: fastest at 128K tokens on an H200 (benchmarks/bench_kernels.py)
    block_n: int = 64,
    num_warps: int = 4,
    key_chunks: int | None = None,
    tensor_cores: bool | None = None,
) -> torch.Tensor:
    """key_chunks: how many slices of the keys pass 1 runs in parallel (default: about four
    programs per SM on CUDA, one elsewhere). tensor_cores: None uses 16-bit tensor-core dots
    where they can run (fp16/bf16 caches and queries on a GPU); False forces fp32 "ieee" dots."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use window_scores_torch")
    num_kv_heads, head_dim = _check_inputs(key_cache, block_table, queries, context_len, layout)
    block_size = paged_dims(key_cache, layout)[0]
    scale = head_dim**-0.5 if scale is None else scale
    n, w, num_q_heads = context_len, queries.shape[0], queries.shape[1]
    group = num_q_heads // num_kv_heads
    rows = group * w
    block_r = max(16, min(block_r, triton.next_power_of_2(rows)))
    row_blocks = triton.cdiv(rows, block_r)
    if key_chunks is None:
        programs = 4 * _num_sms(key_cache.device) if key_cache.is_cuda else 1
        key_chunks = triton.cdiv(programs, num_kv_heads * row_blocks)
    chunks = max(1, min(triton.cdiv(n, block_n), key_chunks))
    chunk_n = triton.cdiv(triton.cdiv(n, chunks), block_n) * block_n
    chunks = triton.cdiv(n, chunk_n)
    s_kb, s_kt, s_kh, s_kd = paged_strides(key_cache, layout)
    common = dict(
        N=n, W=w, GROUP=group, scale_log2=scale * _LOG2E,
        s_qw=queries.stride(0), s_qh=queries.stride(1), s_qd=queries.stride(2),
        s_kb=s_kb, s_kt=s_kt, s_kh=s_kh, s_kd=s_kd, BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
        NATIVE=_uses_native_dot(key_cache, queries) and tensor_cores is not False, BLOCK_R=block_r, BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), num_warps=num_warps,
    )
    block_table = block_table.contiguous()
    part_m = torch.empty(chunks, num_kv_heads * rows, dtype=torch.float32, device=queries.device)
    part_l = torch.empty_like(part_m)
    _window_partial_lse_kernel[(num_kv_heads, row_blocks, chunks)](
        queries, key_cache, block_table, part_m, part_l, CHUNK_N=chunk_n, **common)
    # One row block covers every key (its last row sees them all); several leave causal gaps at 0.
    alloc = torch.zeros if row_blocks > 1 else torch.empty
    psi = alloc(row_blocks, num_kv_heads, n, dtype=torch.float32, device=queries.device)
    _window_psi_kernel[(num_kv_heads, row_blocks, chunks)](
        queries, key_cache, block_table, part_m, part_l, psi, CHUNK_N=chunk_n, NUM_CHUNKS=chunks, **common)
    return psi.sum(dim=0) if row_blocks > 1 else psi[0]
