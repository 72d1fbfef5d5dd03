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

import torch

from ._paged import paged_dims, paged_strides, request_keys

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the torch path needs no triton
    HAS_TRITON = False


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


if HAS_TRITON:
    _LOG2E = 1.4426950408889634

    @triton.jit
    def _load_key_tile(k_ptr, bt_ptr, offs_n, offs_d, N, kv_head, s_kb, s_kt, s_kh, s_kd,
                       BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr):
        # Keys of logical tokens offs_n, found through the request's block table; fp32 (bf16-safe).
        in_ctx = offs_n < N
        blk = tl.load(bt_ptr + offs_n // BLOCK_SIZE, mask=in_ctx, other=0).to(tl.int64)
        ptrs = k_ptr + blk[:, None] * s_kb + (offs_n % BLOCK_SIZE)[:, None] * s_kt + kv_head * s_kh + offs_d[None, :] * s_kd
        return tl.load(ptrs, mask=in_ctx[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0).to(tl.float32)

    @triton.jit
    def _window_logits(q_ptr, offs_w, q_head, offs_d, k, offs_n, N, W, scale_log2, s_qw, s_qh, s_qd,
                       HEAD_DIM: tl.constexpr):
        # Base-2 logits of window queries offs_w (at positions N - W + offs_w) against a key tile,
        # -inf where causality or the context end hides the key (and for padding queries).
        q = tl.load(q_ptr + offs_w[:, None] * s_qw + q_head * s_qh + offs_d[None, :] * s_qd,
                    mask=(offs_w[:, None] < W) & (offs_d[None, :] < HEAD_DIM), other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
        visible = (offs_n[None, :] <= (N - W + offs_w)[:, None]) & (offs_n[None, :] < N) & (offs_w[:, None] < W)
        return tl.where(visible, s, float("-inf"))

    @triton.jit
    def _window_lse_kernel(
        q_ptr, k_ptr, bt_ptr, lse_ptr,
        N, W, GROUP, scale_log2,
        s_qw, s_qh, s_qd,
        s_kb, s_kt, s_kh, s_kd,
        BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # Pass 1. One program owns BLOCK_W window queries of one query head and streams all keys,
        # keeping a running max and sum (base 2): the log-sum-exp pass 2 normalises with.
        pid_h = tl.program_id(0)
        pid_w = tl.program_id(1)
        kv_head = pid_h // GROUP
        offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
        offs_d = tl.arange(0, BLOCK_D)
        m_i = tl.full([BLOCK_W], -1.0e30, tl.float32)  # finite, so fully masked tiles give exp2(-inf) = 0
        l_i = tl.zeros([BLOCK_W], tl.float32)
        for n_start in range(0, N, BLOCK_N):
            offs_n = n_start + tl.arange(0, BLOCK_N)
            k = _load_key_tile(k_ptr, bt_ptr, offs_n, offs_d, N, kv_head, s_kb, s_kt, s_kh, s_kd, BLOCK_SIZE, HEAD_DIM)
            s = _window_logits(q_ptr, offs_w, pid_h, offs_d, k, offs_n, N, W, scale_log2, s_qw, s_qh, s_qd, HEAD_DIM)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
            m_i = m_new
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), 0.0)
        tl.store(lse_ptr + pid_h * W + offs_w, lse, mask=offs_w < W)

    @triton.jit
    def _window_psi_kernel(
        q_ptr, k_ptr, bt_ptr, lse_ptr, psi_ptr,
        N, W, GROUP, scale_log2,
        s_qw, s_qh, s_qd,
        s_kb, s_kt, s_kh, s_kd,
        BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # Pass 2. One program owns BLOCK_N keys of one KV head: it loads them once, then sums the
        # normalised probabilities of every window query of every query head in the GQA group.
        kv_head = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        k = _load_key_tile(k_ptr, bt_ptr, offs_n, offs_d, N, kv_head, s_kb, s_kt, s_kh, s_kd, BLOCK_SIZE, HEAD_DIM)
        acc = tl.zeros([BLOCK_N], tl.float32)
        # Causality: queries before this key tile's first token see none of it; skip their tiles.
        first_w = tl.maximum(pid_n * BLOCK_N - (N - W), 0) // BLOCK_W * BLOCK_W
        for g in range(0, GROUP):
            q_head = kv_head * GROUP + g
            for w_start in range(first_w, W, BLOCK_W):
                offs_w = w_start + tl.arange(0, BLOCK_W)
                s = _window_logits(q_ptr, offs_w, q_head, offs_d, k, offs_n, N, W, scale_log2, s_qw, s_qh, s_qd,
                                   HEAD_DIM)
                lse = tl.load(lse_ptr + q_head * W + offs_w, mask=offs_w < W, other=0.0)
                acc += tl.sum(tl.exp2(s - lse[:, None]), 0)
        tl.store(psi_ptr + kv_head * N + offs_n, acc, mask=offs_n < N)


def window_scores_triton(
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    queries: torch.Tensor,
    context_len: int,
    layout: str = "NHD",
    scale: float | None = None,
    block_w: int = 16,
    block_n: int = 64,
) -> torch.Tensor:
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use window_scores_torch")
    num_kv_heads, head_dim = _check_inputs(key_cache, block_table, queries, context_len, layout)
    block_size = paged_dims(key_cache, layout)[0]
    scale = head_dim**-0.5 if scale is None else scale
    n, w, num_q_heads = context_len, queries.shape[0], queries.shape[1]
    group = num_q_heads // num_kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_table = block_table.contiguous()
    lse = torch.empty(num_q_heads, w, dtype=torch.float32, device=queries.device)
    psi = torch.empty(num_kv_heads, n, dtype=torch.float32, device=queries.device)
    common = dict(
        N=n, W=w, GROUP=group, scale_log2=scale * _LOG2E,
        s_qw=queries.stride(0), s_qh=queries.stride(1), s_qd=queries.stride(2),
    )
    s_kb, s_kt, s_kh, s_kd = paged_strides(key_cache, layout)
    common.update(s_kb=s_kb, s_kt=s_kt, s_kh=s_kh, s_kd=s_kd, BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
                  BLOCK_W=block_w, BLOCK_N=block_n, BLOCK_D=block_d)
    _window_lse_kernel[(num_q_heads, triton.cdiv(w, block_w))](queries, key_cache, block_table, lse, **common)
    _window_psi_kernel[(num_kv_heads, triton.cdiv(n, block_n))](queries, key_cache, block_table, lse, psi, **common)
    return psi
