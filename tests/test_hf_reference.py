"""The HF reference path on tiny random models (fp32): stock equality without eviction, and with
eviction, equality with an independent oracle that keeps the full cache but hides the evicted
tokens from each decode query's attention, head by head."""
import contextlib

import pytest
import torch

from madakv_vllm.hf import generate_sweep, generate_with_eviction, modality_tags
from madakv_vllm.hf.reference import decoder_attention_modules
from madakv_vllm.policies import make_policy
from prompts import hf_inputs

GEN = dict(max_new_tokens=10, do_sample=False)


def mm_inputs(processor, num_images):
    return hf_inputs(processor, num_images)


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    model = LlamaForCausalLM(config).float().eval()
    model.set_attn_implementation("sdpa")
    return model


@contextlib.contextmanager
def sdpa_with_masks(model, mask_for):
    """Stock sdpa attention, with the mask of each decoder layer's call replaced by
    `mask_for(layer, query, key, attention_mask)` (None: left as it is)."""
    from transformers.modeling_utils import AttentionInterface

    layer_of = {id(m): i for i, m in enumerate(decoder_attention_modules(model))}
    mapping = AttentionInterface._global_mapping
    original = mapping["sdpa"]

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        layer = layer_of.get(id(module))
        mask = None if layer is None else mask_for(layer, query, key, attention_mask)
        if mask is not None:
            attention_mask = mask
            kwargs.pop("is_causal", None)
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    mapping["sdpa"] = attention
    try:
        yield
    finally:
        mapping["sdpa"] = original


def hidden_from_decode(model, keep_indices, prompt_len):
    """Oracle: stock attention, except that decode queries cannot see evicted prompt tokens."""

    def decode_mask(layer, query, key, attention_mask):
        if query.shape[2] != 1:
            return None
        keep = keep_indices[layer]  # [Hkv, K]
        group = query.shape[1] // keep.shape[0]
        visible = torch.ones(query.shape[1], key.shape[2], dtype=torch.bool)
        visible[:, :prompt_len] = False
        for hq in range(query.shape[1]):
            visible[hq, keep[hq // group]] = True
        mask = visible[None, :, None, :]
        if attention_mask is not None:
            mask = mask & (attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0)
        return mask

    return sdpa_with_masks(model, decode_mask)


@pytest.mark.parametrize("arch", ["llava", "qwen2vl", "qwen25vl"])
@pytest.mark.parametrize("num_images", [0, 3])
def test_full_budget_reproduces_stock_generate(hf_model, arch, num_images):
    model, processor = hf_model(arch)
    inputs = mm_inputs(processor, num_images)
    stock = model.generate(**inputs, **GEN)
    for policy in (None, make_policy("madakv", budget=1.0)):
        out, report = generate_with_eviction(model, inputs, policy, **GEN)
        assert torch.equal(out, stock)
        assert report.keep_indices is None


@pytest.mark.parametrize("arch", ["llava", "qwen2vl", "qwen25vl"])
@pytest.mark.parametrize("num_images", [0, 3])
@pytest.mark.parametrize("policy_name", ["madakv", "snapkv"])
def test_eviction_equals_hiding_evicted_tokens(hf_model, arch, num_images, policy_name):
    model, processor = hf_model(arch)
    inputs = mm_inputs(processor, num_images)
    n = inputs["input_ids"].shape[1]
    policy = make_policy(policy_name, budget=0.3, window=8)
    out, report = generate_with_eviction(model, inputs, policy, output_scores=True, return_dict_in_generate=True,
                                         **GEN)
    assert report.prompt_len == n and report.keep_indices is not None
    assert report.modality_counts["image"] == (0 if num_images == 0 else int((modality_tags(
        inputs["input_ids"][0], model.config) == 1).sum()))
    with hidden_from_decode(model, report.keep_indices, n):
        oracle = model.generate(**inputs, output_scores=True, return_dict_in_generate=True, **GEN)
    assert torch.equal(out.sequences, oracle.sequences)
    for got, want in zip(out.scores, oracle.scores):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # each layer's cache holds the policy's count plus the decoded tokens, and reports logical length
    generated = out.sequences.shape[1] - n
    for layer, kept in zip(out.past_key_values.layers, report.kept_per_layer):
        assert layer.keys.shape[-2] == kept + generated - 1
        assert layer.get_seq_length() == n + generated - 1
    assert sum(report.kept_per_layer) == policy.kept_tokens(n) * len(report.kept_per_layer)


@pytest.mark.parametrize("arch", ["llava", "qwen2vl"])
def test_sweep_after_one_prefill_equals_separate_generates(hf_model, arch):
    model, processor = hf_model(arch)
    inputs = mm_inputs(processor, 3)
    policies = {"full": None, "madakv": make_policy("madakv", budget=0.3, window=8),
                "paper-hcc wide window": make_policy("madakv", budget=0.2, window=16),
                "balanced": make_policy("madakv", budget=0.2, window=4, hcc_variant="balanced"),
                "streaming": make_policy("streamingllm", budget=0.1, window=8)}
    swept = generate_sweep(model, inputs, policies, max_new_tokens=GEN["max_new_tokens"])
    outputs = set()
    for name, policy in policies.items():
        alone, report = generate_with_eviction(model, inputs, policy, **GEN)
        got, swept_report = swept[name]
        assert torch.equal(got, alone), name
        assert swept_report.kept_per_layer == report.kept_per_layer, name
        outputs.add(tuple(got[0].tolist()))
    assert len(outputs) > 1, "the policies should not all give the same tokens"


def test_value_weighted_policies_see_attention_times_value_norms(hf_model):
    """`value_weighted`: the scores a policy ranks are the window attention scaled by each
    token's value norm in that layer and KV head (the prefill cache's own values)."""
    from madakv_vllm.policies import MadaKV

    seen = {}

    class Recording(MadaKV):
        def select(self, scores, tags, *args, **kwargs):
            seen[self.value_weighted] = scores.clone()
            return super().select(scores, tags, *args, **kwargs)

    model, processor = hf_model("qwen2vl")
    inputs = mm_inputs(processor, 3)
    for weighted in (False, True):
        generate_with_eviction(model, inputs, Recording(budget=0.3, window=8, value_weighted=weighted), **GEN)
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).past_key_values
    norms = torch.stack([layer.values[0].float().norm(dim=-1) for layer in cache.layers])  # [L, Hkv, N]
    torch.testing.assert_close(seen[True], seen[False] * norms)


def test_evicted_generation_differs_from_stock_somewhere(hf_model):
    """Guards the oracle test: eviction must actually change attention, not be a no-op."""
    model, processor = hf_model("qwen2vl")
    inputs = mm_inputs(processor, 3)
    stock = model.generate(**inputs, output_scores=True, return_dict_in_generate=True, **GEN)
    out, _ = generate_with_eviction(model, inputs, make_policy("streamingllm", budget=0.1, window=8),
                                    output_scores=True, return_dict_in_generate=True, **GEN)
    assert not torch.allclose(out.scores[1], stock.scores[1])


@pytest.mark.parametrize("policy_name", ["madakv", "pyramidkv", "h2o", "streamingllm", "lookm"])
def test_text_only_llama(tiny_llama, policy_name):
    ids = torch.randint(0, 300, (1, 160), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    policy = make_policy(policy_name, budget=0.25, window=8)
    out, report = generate_with_eviction(tiny_llama, inputs, policy, output_scores=True,
                                         return_dict_in_generate=True, **GEN)
    assert sum(report.kept_per_layer) == policy.kept_tokens(160) * 3
    with hidden_from_decode(tiny_llama, report.keep_indices, 160):
        oracle = tiny_llama.generate(**inputs, output_scores=True, return_dict_in_generate=True, **GEN)
    assert torch.equal(out.sequences, oracle.sequences)


def test_rejects_batches_and_eager_attention(tiny_llama):
    ids = torch.randint(0, 300, (2, 40))
    with pytest.raises(ValueError, match="batch size 1"):
        generate_with_eviction(tiny_llama, {"input_ids": ids}, make_policy("snapkv", budget=0.5, window=4), **GEN)
    tiny_llama.set_attn_implementation("eager")
    try:
        with pytest.raises(ValueError, match="sdpa"):
            generate_with_eviction(tiny_llama, {"input_ids": ids[:1]}, make_policy("snapkv", budget=0.5, window=4),
                                   **GEN)
    finally:
        tiny_llama.set_attn_implementation("sdpa")


# ---- eviction during prefill (chunks) -----------------------------------------------------------
def test_prefill_chunks_never_split_the_proxy_window():
    from madakv_vllm.hf.reference import prefill_chunks

    assert prefill_chunks(100, 32, 8) == [32, 64, 92, 100]  # 96 would cut the window [92, 100)
    assert prefill_chunks(100, 30, 8) == [30, 60, 90, 100]
    assert prefill_chunks(100, 200, 8) == [100]
    assert prefill_chunks(10, 4, 0) == [4, 8, 10]
    with pytest.raises(ValueError, match="prefill_chunk"):
        prefill_chunks(10, 0, 8)


def hidden_as_evicted_during_prefill(model, report, prompt_len):
    """Oracle: a stock one-shot prefill and decode over the full cache, where each query sees
    only what the chunked cache held when it ran: after the compaction following the chunk
    that ended at e, tokens before e that it did not keep are hidden from every later query;
    decode queries see the final keep sets."""

    def held_mask(layer, query, key, attention_mask):
        heads_kv, key_len = key.shape[1], key.shape[2]
        positions = range(key_len - query.shape[2], key_len)
        visible = torch.ones(heads_kv, len(positions), key_len, dtype=torch.bool)
        for row, q in enumerate(positions):
            visible[:, row, q + 1:] = False  # causal
            if q >= prompt_len:
                held = (prompt_len, report.keep_indices[layer])
            else:
                before = [(end, keep[layer]) for end, keep in report.prefill_compactions if end <= q]
                held = before[-1] if before else None
            if held is not None:
                end, keep = held
                hidden = torch.ones(heads_kv, end, dtype=torch.bool)
                hidden.scatter_(1, keep, False)
                visible[:, row, :end] &= ~hidden
        return visible.repeat_interleave(query.shape[1] // heads_kv, dim=0)[None]

    return sdpa_with_masks(model, held_mask)


@pytest.mark.parametrize("arch", ["llava", "qwen2vl"])
def test_chunked_prefill_without_eviction_during_it_changes_nothing(hf_model, arch):
    model, processor = hf_model(arch)
    inputs = mm_inputs(processor, 3)
    stock = model.generate(**inputs, output_scores=True, return_dict_in_generate=True, **GEN)
    chunked, _ = generate_with_eviction(model, inputs, None, prefill_chunk=24, output_scores=True,
                                        return_dict_in_generate=True, **GEN)
    assert torch.equal(chunked.sequences, stock.sequences)
    torch.testing.assert_close(chunked.scores[0], stock.scores[0], rtol=1e-4, atol=1e-4)
    policy = make_policy("madakv", budget=0.3, window=8)
    alone, report = generate_with_eviction(model, inputs, policy, **GEN)
    in_chunks, chunked_report = generate_with_eviction(model, inputs, policy, prefill_chunk=24, **GEN)
    assert torch.equal(alone, in_chunks) and chunked_report.prefill_compactions == []
    assert all(torch.equal(a, b) for a, b in zip(report.keep_indices, chunked_report.keep_indices))


@pytest.mark.parametrize("arch", ["llava", "qwen2vl"])
@pytest.mark.parametrize("options", [dict(policy="madakv", prefill_scores="chunk"),
                                     dict(policy="madakv", prefill_scores="running",
                                                                       sinks=2),
                                     dict(policy="madakv", prefill_scores="novelty"),
                                     dict(policy="madakv", prefill_scores="ahead"),
                                     dict(policy="madakv", prefill_scores="appended"),
                                     dict(policy="snapkv"), dict(policy="streamingllm")],
                         ids=["madakv-chunk", "madakv-running-sinks", "madakv-novelty", "madakv-ahead",
                              "madakv-appended", "snapkv", "streamingllm"])
def test_eviction_during_prefill_equals_hiding_what_each_chunk_no_longer_held(hf_model, arch, options):
    model, processor = hf_model(arch)
    inputs = mm_inputs(processor, 3)
    n = inputs["input_ids"].shape[1]
    options = dict(options)
    policy = make_policy(options.pop("policy"), budget=0.2, window=8, during_prefill=True, prefill_slack=0.25,
                         **options)
    chunk = 24
    out, report = generate_with_eviction(model, inputs, policy, prefill_chunk=chunk, output_scores=True,
                                         return_dict_in_generate=True, **GEN)
    kept = policy.kept_tokens(n)
    assert len(report.prefill_compactions) >= 3, "the test prompt should be compacted several times"
    assert report.peak_held <= kept + policy.slack_tokens(kept) + chunk
    assert sum(report.kept_per_layer) == kept * len(report.kept_per_layer)  # HCC may move some between layers
    for end, keep in report.prefill_compactions:  # between chunks every layer keeps the prompt's count
        assert all(k.shape[1] == kept and int(k.max()) < end for k in keep)
    with hidden_as_evicted_during_prefill(model, report, n):
        oracle = model.generate(**inputs, output_scores=True, return_dict_in_generate=True, **GEN)
    assert torch.equal(out.sequences, oracle.sequences)
    for got, want in zip(out.scores, oracle.scores):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    generated = out.sequences.shape[1] - n
    for layer, layer_kept in zip(out.past_key_values.layers, report.kept_per_layer):  # positions stayed logical
        assert layer.keys.shape[-2] == layer_kept + generated - 1 and layer.get_seq_length() == n + generated - 1


@pytest.mark.parametrize("arch", ["llava", "qwen2vl"])
def test_ahead_scores_early_chunks_with_the_last_window_run_alone(hf_model, arch, monkeypatch):
    from madakv_vllm.hf import reference

    model, processor = hf_model(arch)
    inputs = mm_inputs(processor, 3)
    policy = make_policy("madakv", budget=0.2, window=8, during_prefill=True, prefill_slack=0.25,
                         prefill_scores="ahead")
    seen = {}
    after_chunk, evict_cache, select = reference.PrefillEviction.after_chunk, reference.evict_cache, policy.select

    def first_compaction(self, cache, queries, scaling, end, run_window):
        due = "keys" not in seen and cache.layers[0].keys.shape[-2] > self.limit
        keys = [layer.keys[0].clone() for layer in cache.layers]
        after_chunk(self, cache, queries, scaling, end, run_window)
        if due:
            seen.update(keys=keys, ahead=dict(self.question_queries), scaling=dict(scaling))

    def record_window(cache, queries, *args, **kwargs):
        seen["window"] = dict(queries)
        return evict_cache(cache, queries, *args, **kwargs)

    def record_scores(scores, *args, **kwargs):
        seen.setdefault("scores", scores)
        return select(scores, *args, **kwargs)

    monkeypatch.setattr(reference.PrefillEviction, "after_chunk", first_compaction)
    monkeypatch.setattr(reference, "evict_cache", record_window)
    monkeypatch.setattr(policy, "select", record_scores)
    _, report = generate_with_eviction(model, inputs, policy, prefill_chunk=24, **GEN)
    assert report.prefill_compactions
    # Layer 0's queries depend only on each token and its position: run alone they equal the
    # prompt's own window queries; deeper layers saw no context, so they differ.
    torch.testing.assert_close(seen["ahead"][0], seen["window"][0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(seen["ahead"][1], seen["window"][1], atol=1e-3)
    # The first compaction's scores: every ahead query attends to every held key (they come after all)
    for layer, keys in enumerate(seen["keys"]):
        want = attention_received(seen["ahead"][layer], keys, seen["scaling"][layer])
        torch.testing.assert_close(seen["scores"][layer], want, rtol=1e-4, atol=1e-5)


def attention_received(queries, keys, scale):
    """Dense oracle: attention each key [Hkv, N, D] gets from queries [W, Hq, D] that see them all,
    summed over the queries and the query heads of its KV head: [Hkv, N]."""
    group = queries.shape[1] // keys.shape[0]
    scale = scale or queries.shape[-1] ** -0.5
    logits = torch.einsum("whd,hnd->hwn", queries, keys.repeat_interleave(group, dim=0)) * scale
    return logits.softmax(dim=-1).sum(dim=1).view(keys.shape[0], group, -1).sum(dim=1)


def test_appended_scores_with_the_window_asked_right_after_the_chunk(tiny_llama, monkeypatch):
    from madakv_vllm.hf import reference

    torch.manual_seed(1)
    n, window, chunk = 200, 8, 40
    ids = torch.randint(0, 300, (1, n))
    policy = make_policy("snapkv", budget=0.2, window=window, during_prefill=True, prefill_slack=0.25,
                         prefill_scores="appended")
    seen, scores = [], []
    after_chunk, select = reference.PrefillEviction.after_chunk, policy.select

    def record(self, cache, queries, scaling, end, run_window):
        held = [(layer.keys.clone(), layer.get_seq_length()) for layer in cache.layers]
        after_chunk(self, cache, queries, scaling, end, run_window)
        if self.report.prefill_compactions and self.report.prefill_compactions[-1][0] == end:
            # where the window cannot follow the chunk (it would reach the prompt's end) the chunk's own queries score
            seen.append((end, held, dict(self.question_queries) if end + window < n else None, dict(scaling)))

    def record_scores(psi, *args, **kwargs):
        scores.append(psi)
        return select(psi, *args, **kwargs)

    monkeypatch.setattr(reference.PrefillEviction, "after_chunk", record)
    monkeypatch.setattr(policy, "select", record_scores)
    out, report = generate_with_eviction(tiny_llama, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                                         policy, prefill_chunk=chunk, **GEN)
    assert len(seen) >= 2
    end, held, appended, _ = seen[0]  # nothing evicted yet: the window asked after the prompt's first `end` tokens
    cap = reference._Capture(tiny_llama, lambda q_len: min(window, q_len))
    positions = torch.cat([torch.arange(end), torch.arange(n - window, n)])[None]
    with reference._wrapped_sdpa(cap), torch.no_grad():
        tiny_llama(input_ids=torch.cat([ids[:, :end], ids[:, n - window:]], dim=1), position_ids=positions)
    for layer, q in appended.items():
        torch.testing.assert_close(q, cap.queries[layer], rtol=1e-4, atol=1e-5)
    # each compaction scores what the chunks left (the window's own keys and values are dropped again),
    # at their logical positions: what the compaction before kept and the chunks since
    previous = (0, None)
    assert seen[-1][0] + window == n and seen[-1][2] is None  # 192 = 6 x (40 - 8): chunks carry their probe
    for (at, held, appended, scaling), psi, (_, keep) in zip(seen[:-1], scores, report.prefill_compactions):
        for layer, (keys, _) in enumerate(held):
            since = torch.arange(previous[0], at).expand(keys.shape[1], -1)
            logical = since if previous[1] is None else torch.cat([previous[1][layer], since], dim=1)
            want = attention_received(appended[layer], keys[0], scaling[layer])
            torch.testing.assert_close(psi[layer].gather(1, logical), want, rtol=1e-4, atol=1e-5)
        previous = (at, keep)
    later_end, later_held, _, _ = seen[1]
    assert all(keys.shape[-2] <= policy.kept_tokens(n) + later_end - end and length == later_end
               for keys, length in later_held)
    assert not torch.allclose(seen[1][2][1], cap.queries[1], atol=1e-3)  # asked again over what is held now


def test_during_prefill_needs_chunks(hf_model):
    model, processor = hf_model("llava")
    with pytest.raises(ValueError, match="prefill_chunk"):
        generate_with_eviction(model, mm_inputs(processor, 1), make_policy("madakv", during_prefill=True), **GEN)


def test_sweep_runs_policies_that_evict_during_prefill_on_their_own(hf_model):
    model, processor = hf_model("llava")
    inputs = mm_inputs(processor, 3)
    policies = {"one-shot": make_policy("madakv", budget=0.2, window=8),
                "during prefill": make_policy("madakv", budget=0.2, window=8, during_prefill=True, prefill_slack=8)}
    swept = generate_sweep(model, inputs, policies, max_new_tokens=GEN["max_new_tokens"], prefill_chunk=24)
    alone, report = generate_with_eviction(model, inputs, policies["during prefill"], prefill_chunk=24, **GEN)
    assert torch.equal(swept["during prefill"][0], alone) and swept["during prefill"][1].prefill_compactions
    assert torch.equal(swept["one-shot"][0], generate_with_eviction(model, inputs, policies["one-shot"], **GEN)[0])


# ---- eviction during decode (policy.decode_budget) ------------------------------------------------
def hidden_as_evicted_during_decode(model, report, prompt_len):
    """Oracle: stock attention, except that the decode query at logical position t sees only what
    the cache held then: the last decode compaction at or before t kept `keep` of its first
    `point` tokens and every token since (before any: the prompt's survivors and the output)."""
    stages = [(prompt_len, report.keep_indices)] + report.decode_compactions

    def decode_mask(layer, query, key, attention_mask):
        if query.shape[2] != 1:
            return None
        t = key.shape[2] - 1
        point, keep = max((s for s in stages if s[0] <= t), key=lambda s: s[0])
        if keep is None:
            return None
        keep = keep[layer]
        group = query.shape[1] // keep.shape[0]
        visible = torch.ones(query.shape[1], key.shape[2], dtype=torch.bool)
        visible[:, :point] = False
        for hq in range(query.shape[1]):
            visible[hq, keep[hq // group]] = True
        return visible[None, :, None, :]

    return sdpa_with_masks(model, decode_mask)


DECODE_GEN = dict(max_new_tokens=48, min_new_tokens=48, do_sample=False)


@pytest.mark.parametrize("arch", ["llava", "qwen2vl"])
@pytest.mark.parametrize("options", [dict(policy="madakv"), dict(policy="madakv", budget=1.0),
                                     dict(policy="snapkv", decode_slack=3, sinks=2), dict(policy="streamingllm")],
                         ids=["madakv", "prompt-not-evicted", "snapkv-small-slack-sinks", "streamingllm"])
def test_eviction_during_decode_equals_hiding_what_each_step_no_longer_held(hf_model, arch, options):
    model, processor = hf_model(arch)
    inputs = mm_inputs(processor, 3)
    n = inputs["input_ids"].shape[1]
    settings = dict(budget=0.3, window=8, decode_budget=24, decode_slack=10)
    settings.update(options)
    policy = make_policy(settings.pop("policy"), **settings)
    out, report = generate_with_eviction(model, inputs, policy, output_scores=True, return_dict_in_generate=True,
                                         **DECODE_GEN)
    assert len(report.decode_compactions) >= 3, "the output should be compacted several times"
    cap, slack = 24, max(settings["decode_slack"], 8)
    prompt_held = max(report.kept_per_layer)
    assert report.decode_peak_held <= max(cap + slack, prompt_held + 8)
    last = 0
    for point, keep in report.decode_compactions:  # every layer back to the cap, chosen among the first `point`
        assert point - last >= 8 and all(k.shape[1] == cap and int(k.max()) < point for k in keep)
        assert all(torch.equal(k[:, -8:], torch.arange(point - 8, point).expand(k.shape[0], -1)) for k in keep)
        last = point
    with hidden_as_evicted_during_decode(model, report, n):
        oracle = model.generate(**inputs, output_scores=True, return_dict_in_generate=True, **DECODE_GEN)
    assert torch.equal(out.sequences, oracle.sequences)
    for got, want in zip(out.scores, oracle.scores):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    total = out.sequences.shape[1] - 1  # the last token is never fed back
    for layer in out.past_key_values.layers:  # positions stayed logical
        assert layer.keys.shape[-2] == cap + total - report.decode_compactions[-1][0]
        assert layer.get_seq_length() == total


def test_decode_points_follow_the_cap_and_the_slack():
    policy = make_policy("madakv", budget=0.2, window=8, decode_budget=100, decode_slack=0.25)
    assert policy.decode_cap(1000) == 100
    # after the prompt: 200 kept of 1000 (evicted 800) is over the cap, compacted once 8 queries scored it
    assert policy.decode_point(1000, evicted_min=800, since=1000) == 1008
    # then every 25 tokens (cap + slack held)
    assert policy.decode_point(1000, evicted_min=1008 - 100, since=1008) == 1033
    assert make_policy("madakv", window=8, decode_budget=0.05).decode_cap(1000) == 50
    assert make_policy("madakv", window=8, decode_budget=4).decode_cap(1000) == 8  # never below the window
    assert make_policy("madakv").decode_point(1000, 0, 1000) is None
    for bad in (dict(decode_budget=0), dict(decode_budget=1.5), dict(decode_budget="x"), dict(decode_slack=-1)):
        with pytest.raises(ValueError, match="decode_"):
            make_policy("madakv", **bad)
