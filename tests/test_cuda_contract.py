"""The CUDA path's contract, checked on CPU: vLLM 0.32's own Triton ops, the cache writer and the
unified attention kernel that its Triton and FlashAttention-layout backends use, run under
TRITON_INTERPRET on CPU tensors, around our kernels:

  vLLM writes a paged KV cache (its packed [blocks, kv_heads, block_size, 2 * head_dim] layout,
  either physical stride order) -> we read it through the views the worker uses, score the window
  and compact each head's kept tokens into fresh blocks (our Triton kernels, interpreted) -> vLLM
  writes the next token at its physical slot and runs unified attention with physical seq_lens
  and the swapped block table -> equal to a dense torch reference over each head's kept tokens.

vLLM on CPU replaces Triton by a placeholder (its importer finds no CPU backend), so the op
modules are imported afresh with the real Triton; their launchers ask the CUDA device for its
compute capability, answered here as an H100's (sm90) to pick their CUDA launch heuristics.
With a GPU (scripts/gpu_check.sh) the same test runs natively on CUDA tensors, nothing patched.
"""
import importlib
import math
import sys
from types import SimpleNamespace

import pytest
import torch

from madakv_kernels import compact_kv_triton, window_scores_triton
from madakv_vllm.policies import make_policy
from madakv_vllm.vllm.kv_layout import key_value_views

HEAD_DIM, KV_HEADS, WINDOW = 32, 2, 8
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 dots: exact in the interpreter, TF32 tensor cores in vLLM's kernels on a GPU
TOLERANCE = dict(rtol=3e-3, atol=3e-3) if DEVICE == "cuda" else dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def vllm_ops():
    """vLLM's cache writer and unified attention, compiled by the real Triton (interpreted on CPU)."""
    if DEVICE == "cuda":
        from vllm.v1.attention.ops.triton_reshape_and_cache_flash import triton_reshape_and_cache_flash
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention

        yield SimpleNamespace(write=triton_reshape_and_cache_flash, attention=unified_attention)
        return
    import triton
    import triton.language as tl
    import vllm.triton_utils as triton_utils

    ops = [name for name in sys.modules if name.startswith("vllm.v1.attention.ops")]
    saved = {name: sys.modules.pop(name) for name in ops}
    saved_triton = (triton_utils.triton, triton_utils.tl, triton_utils.HAS_TRITON)
    triton_utils.triton, triton_utils.tl, triton_utils.HAS_TRITON = triton, tl, True
    capability = torch.cuda.get_device_capability
    torch.cuda.get_device_capability = lambda *args, **kwargs: (9, 0)
    try:
        yield SimpleNamespace(
            write=importlib.import_module("vllm.v1.attention.ops.triton_reshape_and_cache_flash")
            .triton_reshape_and_cache_flash,
            attention=importlib.import_module("vllm.v1.attention.ops.triton_unified_attention").unified_attention)
    finally:
        torch.cuda.get_device_capability = capability
        triton_utils.triton, triton_utils.tl, triton_utils.HAS_TRITON = saved_triton
        for name in [name for name in sys.modules if name.startswith("vllm.v1.attention.ops")]:
            sys.modules.pop(name)
        sys.modules.update(saved)


def packed_kv_cache(num_blocks, block_size, physical):
    """The backends' [blocks, kv_heads, block_size, 2 * head_dim] cache; "NHD" stores each block
    token-major underneath (a stride order vLLM may pick), "HND" head-major."""
    if physical == "NHD":
        return torch.zeros(num_blocks, block_size, KV_HEADS, 2 * HEAD_DIM, device=DEVICE).permute(0, 2, 1, 3)
    return torch.zeros(num_blocks, KV_HEADS, block_size, 2 * HEAD_DIM, device=DEVICE)


def slots(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    positions = positions.to(block_table.device)
    return block_table.long()[positions // block_size] * block_size + positions % block_size


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen).to(DEVICE)


CASES = [  # (GQA group, block size, prompt lengths, physical order)
    (1, 16, [37, 50], "HND"),
    (4, 32, [70, 45, 33], "NHD"),
    (7, 16, [90], "NHD"),
    (2, 128, [130, 200], "HND"),
]


@pytest.mark.parametrize("group, block_size, lengths, physical", CASES,
                         ids=lambda c: str(c) if not isinstance(c, list) else "x".join(map(str, c)))
def test_compacted_cache_attends_like_the_kept_tokens(vllm_ops, group, block_size, lengths, physical):
    gen = torch.Generator().manual_seed(group * 1000 + block_size)
    per_request_blocks = [math.ceil(n / block_size) for n in lengths]
    num_blocks = 2 * sum(per_request_blocks) + len(lengths) + 2
    kv_cache = packed_kv_cache(num_blocks, block_size, physical)
    backend_keys, backend_values = kv_cache.transpose(1, 2).split(HEAD_DIM, dim=-1)  # the backend's own views
    keys, values, layout = key_value_views(kv_cache, impl=object())  # what the worker reads and compacts
    free = torch.randperm(num_blocks, generator=gen).int().tolist()
    one = torch.tensor(1.0, device=DEVICE)

    # 1. prefill: vLLM writes every request's prompt KV (one batched call)
    prompts = []
    for n, blocks in zip(lengths, per_request_blocks):
        table = torch.tensor([free.pop() for _ in range(blocks)], dtype=torch.int32, device=DEVICE)
        prompts.append(SimpleNamespace(n=n, table=table, k=randn(gen, n, KV_HEADS, HEAD_DIM),
                                       v=randn(gen, n, KV_HEADS, HEAD_DIM)))
    vllm_ops.write(torch.cat([p.k for p in prompts]), torch.cat([p.v for p in prompts]), backend_keys,
                   backend_values, torch.cat([slots(p.table, torch.arange(p.n), block_size) for p in prompts]),
                   "auto", one, one)

    # 2. our scoring + selection + copy-on-compact into fresh blocks
    policy = make_policy("snapkv", budget=0.3, window=WINDOW)
    for p in prompts:
        queries = randn(gen, WINDOW, KV_HEADS * group, HEAD_DIM)
        psi = window_scores_triton(keys, p.table, queries, p.n, layout)
        p.keep = policy.select(psi[None], torch.zeros(p.n, dtype=torch.int8, device=DEVICE))[0]  # [kv_heads, kept]
        kept = p.keep.shape[1]
        p.new_table = torch.tensor([free.pop() for _ in range(math.ceil((kept + 1) / block_size))], dtype=torch.int32,
                                   device=DEVICE)
        compact_kv_triton(keys, values, p.table, p.new_table, p.keep, layout)

    # 3. decode: vLLM writes the new token at its physical slot, then runs unified attention
    new_k = randn(gen, len(prompts), KV_HEADS, HEAD_DIM)
    new_v = randn(gen, len(prompts), KV_HEADS, HEAD_DIM)
    physical_lens = [p.keep.shape[1] for p in prompts]
    vllm_ops.write(new_k, new_v, backend_keys, backend_values,
                   torch.stack([slots(p.new_table, torch.tensor([kept]), block_size)[0]
                                for p, kept in zip(prompts, physical_lens)]), "auto", one, one)
    width = max(len(p.new_table) for p in prompts)
    block_table = torch.zeros(len(prompts), width, dtype=torch.int32, device=DEVICE)
    for i, p in enumerate(prompts):
        block_table[i, : len(p.new_table)] = p.new_table
    q = randn(gen, len(prompts), KV_HEADS * group, HEAD_DIM)
    out = torch.empty_like(q)
    seq_lens = torch.tensor([kept + 1 for kept in physical_lens], dtype=torch.int32, device=DEVICE)
    vllm_ops.attention(q=q, k=backend_keys, v=backend_values, out=out,
                       cu_seqlens_q=torch.arange(len(prompts) + 1, dtype=torch.int32, device=DEVICE), max_seqlen_q=1,
                       seqused_k=seq_lens, max_seqlen_k=int(seq_lens.max()), softmax_scale=HEAD_DIM**-0.5, causal=True,
                       window_size=(-1, -1), block_table=block_table, softcap=0, q_descale=None, k_descale=None,
                       v_descale=None)

    # 4. dense reference: each query head attends to its KV head's kept prompt tokens + the new token
    for i, p in enumerate(prompts):
        for head in range(KV_HEADS * group):
            kv_head = head // group
            k_seen = torch.cat([p.k[p.keep[kv_head], kv_head], new_k[i, kv_head][None]])
            v_seen = torch.cat([p.v[p.keep[kv_head], kv_head], new_v[i, kv_head][None]])
            weights = torch.softmax(k_seen @ q[i, head] * HEAD_DIM**-0.5, dim=0)
            torch.testing.assert_close(out[i, head], weights @ v_seen, **TOLERANCE)
    # heads kept different tokens, so the test would see a head reading another head's tokens
    assert any(not torch.equal(p.keep[0], p.keep[1]) for p in prompts)


def test_runner_edits_its_inputs_before_attention_metadata_and_graph_dispatch():
    """The worker hooks rely on the order of vLLM's V1 execute_model: `_update_states` (plans
    applied, block-table rows swapped) -> `_prepare_inputs` (physical seq_lens and slots written
    into the persistent buffers) -> `_determine_batch_execution_and_padding` (cudagraph mode) ->
    `_build_attention_metadata` (reads those buffers; a FULL graph replays with them)."""
    import inspect

    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    source = inspect.getsource(GPUModelRunner.execute_model)
    calls = ["self._update_states(", "self._prepare_inputs(", "self._determine_batch_execution_and_padding(",
             "self._build_attention_metadata("]
    positions = [source.find(call) for call in calls]
    assert all(p >= 0 for p in positions), dict(zip(calls, positions))
    assert positions == sorted(positions), dict(zip(calls, positions))
