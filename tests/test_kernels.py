"""Paged scoring and compaction: Triton == torch reference == dense oracle.

On CPU the Triton kernels run under TRITON_INTERPRET=1; with a GPU (scripts/device_check.sh) the
same tests run natively on CUDA tensors, where 16-bit caches take the tensor-core dot.
"""
import math

import pytest
import torch

from madakv_kernels import (
    compact_kv,
    compact_kv_torch,
    compact_kv_triton,
    dense_as_paged,
    gather_tokens,
    key_novelty,
    modality_mass,
    value_norms,
    window_scores,
    window_scores_torch,
    window_scores_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_paged(n, num_kv_heads, head_dim, block_size, layout, dtype=torch.float32, spare_blocks=3, seed=0):
    """A paged cache (on DEVICE) holding n random tokens of one request in shuffled blocks, and the
    dense keys (on CPU)."""
    gen = torch.Generator().manual_seed(seed)
    used = math.ceil(n / block_size)
    num_blocks = used + spare_blocks
    dense = torch.randn(num_blocks * block_size, num_kv_heads, head_dim, generator=gen)
    block_table = torch.randperm(num_blocks, generator=gen)[:used].int()
    nhd = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)  # junk in spare slots
    for logical_block, physical in enumerate(block_table.tolist()):
        nhd[physical] = dense[logical_block * block_size:(logical_block + 1) * block_size]
    cache = nhd if layout == "NHD" else nhd.transpose(1, 2).contiguous()
    return cache.to(DEVICE, dtype), block_table.to(DEVICE), dense[:n].to(dtype)


def randn(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def dense_oracle(keys, queries, n, scale=None):
    """psi from the textbook formula, one query at a time: [Hkv, n]."""
    num_kv_heads, (w, num_q_heads, d) = keys.shape[1], queries.shape
    group = num_q_heads // num_kv_heads
    scale = d**-0.5 if scale is None else scale
    psi = torch.zeros(num_kv_heads, n, dtype=torch.float64)
    for j in range(w):
        pos = n - w + j
        if pos < 0:
            continue
        for hq in range(num_q_heads):
            k = keys[: pos + 1, hq // group].double()
            psi[hq // group, : pos + 1] += torch.softmax(k @ queries[j, hq].double() * scale, dim=0)
    return psi.float()


SHAPES = [  # (n, window, kv heads, GQA group, head_dim, block_size)
    (100, 16, 2, 1, 32, 16),
    (37, 40, 1, 7, 64, 8),      # window longer than the prompt, GQA 7
    (203, 32, 2, 2, 80, 32),    # head_dim not a power of two, n not a multiple of the block size
    (129, 8, 1, 4, 32, 128),    # one big block
]


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n{}_w{}_h{}_g{}_d{}_bs{}".format(*s))
def test_window_scores_triton_matches_torch_and_oracle(layout, shape):
    n, w, hkv, group, d, bs = shape
    cache, table, keys = make_paged(n, hkv, d, bs, layout)
    queries = randn(w, hkv * group, d, seed=1)
    expected = dense_oracle(keys, queries.cpu(), n)
    ref = window_scores_torch(cache, table, queries, n, layout)
    tri = window_scores_triton(cache, table, queries, n, layout)
    torch.testing.assert_close(ref.cpu(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tri.cpu(), expected, rtol=1e-4, atol=1e-5)
    # every valid window query of every query head distributes exactly one unit of attention
    assert tri.sum().item() == pytest.approx(min(w, n) * hkv * group, rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_window_scores_low_precision_caches(dtype):
    n, w, hkv, group, d, bs = 90, 16, 2, 2, 32, 16
    cache, table, keys = make_paged(n, hkv, d, bs, "NHD", dtype=dtype)
    queries = randn(w, hkv * group, d, seed=2, dtype=dtype)
    expected = dense_oracle(keys.float(), queries.float().cpu(), n)  # same rounded inputs, exact math
    torch.testing.assert_close(window_scores_triton(cache, table, queries, n).cpu(), expected, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(window_scores_torch(cache, table, queries, n).cpu(), expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("key_chunks", [1, 3, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_scores_split_keys_and_wide_gqa(key_chunks, dtype):
    """Pass 1 split over key slices (as on a GPU) with a Qwen2.5-VL-like 7:1 GQA group and W=32:
    more rows than one row block, slices that end inside a paged block."""
    n, w, hkv, group, d, bs = 1000, 32, 2, 7, 128, 16
    cache, table, keys = make_paged(n, hkv, d, bs, "NHD", dtype=dtype, seed=7)
    queries = randn(w, hkv * group, d, seed=8, dtype=dtype)
    expected = dense_oracle(keys.float(), queries.float().cpu(), n)
    got = window_scores_triton(cache, table, queries, n, key_chunks=key_chunks)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("block_r", [16, 32, 64])
def test_window_scores_row_blocks_end_on_tile_edges(block_r):
    """Row blocks whose last query sits just before a key-tile edge (n - w + 2 = 64 with
    block_r 16 and GQA 7: row 15 is window query 2) must still reach the key at that edge."""
    n, w, hkv, group, d, bs = 94, 32, 1, 7, 32, 16
    cache, table, keys = make_paged(n, hkv, d, bs, "NHD", seed=10)
    queries = randn(w, hkv * group, d, seed=11)
    expected = dense_oracle(keys, queries.cpu(), n)
    got = window_scores_triton(cache, table, queries, n, block_r=block_r, block_n=16)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-5)


def test_window_scores_custom_scale_and_dense_view():
    n, w, hkv, group, d = 50, 8, 2, 2, 32
    keys = randn(hkv, n, d, seed=0)
    queries = randn(w, hkv * group, d, seed=1)
    cache, table = dense_as_paged(keys)  # the HF path's view: one HND block of n tokens
    expected = dense_oracle(keys.transpose(0, 1).cpu(), queries.cpu(), n, scale=0.05)
    torch.testing.assert_close(window_scores_torch(cache, table, queries, n, "HND", scale=0.05).cpu(), expected,
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(window_scores_triton(cache, table, queries, n, "HND", scale=0.05).cpu(), expected,
                               rtol=1e-4, atol=1e-5)


def test_window_scores_rejects_bad_shapes():
    cache, table, _ = make_paged(40, 2, 32, 16, "NHD")
    with pytest.raises(ValueError, match="not a multiple"):
        window_scores_torch(cache, table, randn(4, 3, 32, seed=0), 40)
    with pytest.raises(ValueError, match="cannot hold"):
        window_scores_torch(cache, table[:1], randn(4, 2, 32, seed=0), 40)
    with pytest.raises(ValueError, match="layout"):
        window_scores_torch(cache, table, randn(4, 2, 32, seed=0), 40, layout="XYZ")


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_value_norms_read_each_token_of_the_request_from_its_blocks(layout, dtype):
    cache, block_table, dense = make_paged(203, 2, 80, 32, layout, dtype)
    norms = value_norms(cache, block_table, 203, layout)
    assert norms.dtype == torch.float32 and norms.shape == (2, 203)
    torch.testing.assert_close(norms.cpu(), dense.float().norm(dim=-1).T)
    dense_cache, table = dense_as_paged(dense.transpose(0, 1).to(DEVICE))  # the HF path's dense view
    torch.testing.assert_close(value_norms(dense_cache, table, 203, "HND").cpu(), norms.cpu())


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_key_novelty_ranks_the_key_unlike_the_others_first(layout):
    cache, block_table, dense = make_paged(203, 2, 80, 32, layout, torch.float32)
    novelty = key_novelty(cache, block_table, 203, layout)
    assert novelty.shape == (2, 203)
    torch.testing.assert_close(novelty.sum(dim=1).cpu(), torch.ones(2))
    keys = dense.float().transpose(0, 1)  # [H, N, D]
    want = 1 - torch.nn.functional.cosine_similarity(keys, keys.mean(dim=1, keepdim=True), dim=-1)
    torch.testing.assert_close(novelty.cpu(), want / want.sum(dim=1, keepdim=True))
    # keys that repeat one direction, and one that points the other way: that one scores highest
    same = torch.ones(1, 40, 8)
    same[0, 17] = -1
    cache, table = dense_as_paged(same.to(DEVICE))
    assert int(key_novelty(cache, table, 40, "HND").argmax()) == 17


def test_modality_mass_splits_scores_by_tag():
    psi = torch.rand(3, 20)
    tags = torch.tensor([0] * 5 + [1] * 6 + [0] * 2 + [2] * 4 + [0] * 3)
    mass = modality_mass(psi, tags, 17)
    torch.testing.assert_close(mass[:, 0], psi[:, [0, 1, 2, 3, 4, 11, 12]].sum(1))
    torch.testing.assert_close(mass[:, 1], psi[:, 5:11].sum(1))
    torch.testing.assert_close(mass[:, 2], psi[:, 13:17].sum(1))


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("impl", [compact_kv_torch, compact_kv_triton], ids=["torch", "triton"])
def test_compaction_gathers_each_heads_tokens(layout, dtype, impl):
    n, hkv, d, bs, kept = 75, 3, 32, 16, 29
    keys, src_table, dense_k = make_paged(n, hkv, d, bs, layout, dtype=dtype, spare_blocks=4, seed=3)
    values, _, _ = make_paged(n, hkv, d, bs, layout, dtype=dtype, spare_blocks=4, seed=3)
    values.mul_(-2)  # distinct from keys, same paging
    num_blocks = keys.shape[0]
    free = [b for b in range(num_blocks) if b not in set(src_table.tolist())]
    dst_table = torch.tensor(free[:2], dtype=torch.int32, device=DEVICE)  # 2 x 16 slots >= 29
    gen = torch.Generator().manual_seed(4)
    keep = torch.stack([torch.randperm(n, generator=gen)[:kept].sort().values for _ in range(hkv)]).to(DEVICE)
    before_src = gather_tokens(keys, src_table, torch.arange(n, device=DEVICE), layout).clone()
    impl(keys, values, src_table, dst_table, keep, layout)
    got_k = gather_tokens(keys, dst_table, torch.arange(kept, device=DEVICE), layout)  # [K, H, D]
    got_v = gather_tokens(values, dst_table, torch.arange(kept, device=DEVICE), layout)
    src_v = gather_tokens(values, src_table, torch.arange(n, device=DEVICE), layout)
    for h in range(hkv):
        assert torch.equal(got_k[:, h], before_src[keep[h], h])
        assert torch.equal(got_v[:, h], src_v[keep[h], h])
    # copy-on-compact: the source blocks are untouched
    assert torch.equal(gather_tokens(keys, src_table, torch.arange(n, device=DEVICE), layout), before_src)


def test_dispatch_uses_torch_on_cpu_and_triton_when_forced(monkeypatch):
    cache, table, _ = make_paged(60, 2, 32, 16, "NHD")
    cache, table, queries = cache.cpu(), table.cpu(), torch.randn(8, 4, 32)
    calls = []
    import madakv_kernels

    monkeypatch.setattr(madakv_kernels, "window_scores_triton", lambda *a, **k: calls.append("triton"))
    monkeypatch.delenv("MADAKV_FORCE_TRITON", raising=False)
    assert window_scores(cache, table, queries, 60).shape == (2, 60)
    assert calls == []
    monkeypatch.setenv("MADAKV_FORCE_TRITON", "1")
    window_scores(cache, table, queries, 60)
    assert calls == ["triton"]


def test_compact_kv_dispatch_matches_reference():
    keys, table, _ = make_paged(40, 2, 32, 16, "HND", spare_blocks=3)
    values = keys.clone() * 3
    keep = torch.stack([torch.arange(0, 40, 2), torch.arange(1, 40, 2)]).to(DEVICE)
    dst = torch.tensor([k for k in range(keys.shape[0]) if k not in table.tolist()][:2], dtype=torch.int32,
                       device=DEVICE)
    k2, v2 = keys.clone(), values.clone()
    compact_kv(keys, values, table, dst, keep, "HND")
    compact_kv_torch(k2, v2, table, dst, keep, "HND")
    assert torch.equal(keys, k2) and torch.equal(values, v2)


@pytest.mark.parametrize("images", [[], [(5, 25)], [(5, 25), (40, 60), (70, 90)]], ids=["none", "one", "three"])
def test_window_scores_modality_masses(images):
    """What MadaKV's MPA splits budgets by: each head's mass per modality before the window."""
    n, w = 110, 16
    cache, table, keys = make_paged(n, 2, 32, 16, "NHD")
    queries = randn(w, 4, 32, seed=6)
    tags = torch.zeros(n, dtype=torch.int8)
    for start, end in images:
        tags[start:end] = 1
    tags[100:104] = 2  # video tokens inside the window do not count
    psi = window_scores(cache, table, queries, n)
    psi, mass = psi.cpu(), modality_mass(psi, tags.to(DEVICE), n - w).cpu()
    expected_psi = dense_oracle(keys, queries.cpu(), n)
    torch.testing.assert_close(psi, expected_psi, rtol=1e-4, atol=1e-5)
    image = tags[: n - w] == 1
    torch.testing.assert_close(mass[:, 1], expected_psi[:, : n - w][:, image].sum(1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mass.sum(1), expected_psi[:, : n - w].sum(1), rtol=1e-4, atol=1e-5)
    assert (mass[:, 2] == 0).all()
    if not images:
        assert (mass[:, 1] == 0).all()


@pytest.mark.parametrize("impl", [compact_kv_torch, compact_kv_triton], ids=["torch", "triton"])
def test_compaction_with_transposed_keys(impl):
    """vLLM's CPU backend stores each block's keys transposed (head_dim x block_size) and its
    values token by token, in one buffer: key and value views then have different strides."""
    blocks, heads, bs, d = 6, 2, 16, 32
    buffer = randn(blocks, heads, bs, 2 * d, seed=9)
    s_block, s_head = buffer.stride()[:2]
    keys = buffer.as_strided((blocks, heads, bs, d), (s_block, s_head, 1, bs), 0)
    values = buffer.as_strided((blocks, heads, bs, d), (s_block, s_head, d, 1), bs * d)
    src = torch.tensor([4, 1], dtype=torch.int32, device=DEVICE)
    dst = torch.tensor([3, 0], dtype=torch.int32, device=DEVICE)
    keep = torch.stack([torch.arange(0, 30, 2), torch.arange(1, 31, 2)]).to(DEVICE)
    tokens = torch.arange(31, device=DEVICE)
    before_k = gather_tokens(keys, src, tokens, "HND").clone()
    before_v = gather_tokens(values, src, tokens, "HND").clone()
    impl(keys, values, src, dst, keep, "HND")
    got_k = gather_tokens(keys, dst, tokens[:15], "HND")
    got_v = gather_tokens(values, dst, tokens[:15], "HND")
    for h in range(heads):
        assert torch.equal(got_k[:, h], before_k[keep[h], h])
        assert torch.equal(got_v[:, h], before_v[keep[h], h])
