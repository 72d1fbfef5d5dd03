"""Selection helpers and the policies' contracts (no model needed)."""
import itertools
import math

import pytest
import torch

from madakv_kernels import coverage_demand, span_ranks, split_quota, topk_mask
from madakv_vllm.policies import H2O, POLICIES, LookM, MadaKV, PyramidKV, SnapKV, StreamingLLM, make_policy


def scores_and_tags(num_layers=6, heads=4, n=300, images=((20, 120), (150, 230)), seed=0):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_layers, heads, n, generator=gen) ** 4
    tags = torch.zeros(n, dtype=torch.int8)
    for start, end in images:
        tags[start:end] = 1
    return scores, tags


# ---- selection helpers --------------------------------------------------------------------------
def test_coverage_demand_is_the_smallest_covering_set():
    gen = torch.Generator().manual_seed(5)
    psi = torch.rand(3, 12, generator=gen)
    member = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 0], dtype=torch.bool)
    for theta in (0.3, 0.5, 0.9, 1.0):
        demand = coverage_demand(psi, member, theta)
        for h in range(3):
            vals = psi[h, member].sort(descending=True).values
            brute = next(k for k in range(1, len(vals) + 1) if vals[:k].sum() >= theta * vals.sum() - 1e-6)
            assert demand[h].item() == brute
    assert coverage_demand(psi, torch.zeros(12, dtype=torch.bool), 0.9).tolist() == [0, 0, 0]


def test_topk_mask_picks_per_head_counts_among_members():
    psi = torch.tensor([[5.0, 4, 3, 2, 1], [1.0, 2, 3, 4, 5]])
    member = torch.tensor([True, False, True, True, True])
    mask = topk_mask(psi, member, torch.tensor([2, 3]))
    assert mask.tolist() == [[True, False, True, False, False], [False, False, True, True, True]]


def test_topk_mask_matches_a_per_head_sort_with_ties_and_per_head_members():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        scores = torch.randint(0, 5, (3, 40), generator=generator).float()  # many ties: lower position first
        member = torch.rand(3, 40, generator=generator) < 0.6
        counts = torch.randint(0, 40, (3,), generator=generator)
        mask = topk_mask(scores, member, counts)
        for h in range(3):
            best = sorted((p for p in range(40) if member[h, p]), key=lambda p: (-scores[h, p], p))[:counts[h]]
            assert mask[h].nonzero().flatten().tolist() == sorted(best)


def test_madakv_caps_walk_one_rank_order_as_a_per_head_loop_would():
    """The default quota rule, picked from one sort, against the rule spelled out head by head."""
    generator = torch.Generator().manual_seed(1)
    n, count, span = 120, 30, 4
    tags = torch.zeros(n, dtype=torch.int8)
    tags[20:50] = 1
    tags[90:100] = 1
    policy = MadaKV(hcc=False, window=0, budget=0.25, span=span, mpa_quota="caps")
    for _ in range(10):
        psi = torch.rand(4, n, generator=generator) ** 4
        present = torch.rand(4, n, generator=generator) < 0.8
        keep = policy.choose(psi, tags, count, present)
        ranked, share = policy.rank_scores(psi, tags), policy.visual_share(psi, tags)
        for h in range(4):
            order = sorted(range(n), key=lambda p: (-ranked[h, p], p))
            members = [p for p in order if present[h, p]]
            caps = {1: math.ceil(count * share[h].item() / span - 1e-6) * span}
            caps[0] = math.ceil(count * (1 - share[h].item()) / span - 1e-6) * span
            allowed, seen = [], {0: 0, 1: 0}
            for p in members:  # each modality's best, up to its cap
                seen[int(tags[p])] += 1
                if seen[int(tags[p])] <= caps[int(tags[p])]:
                    allowed.append(p)
            chosen = allowed[:count]
            chosen += [p for p in members if p not in chosen][:count - len(chosen)]
            assert keep[h].nonzero().flatten().tolist() == sorted(chosen)


def test_split_quota_follows_shares_and_gives_overflow_away():
    visual, text = split_quota(10, torch.tensor([0.0, 0.26, 0.5, 1.0]), n_visual=8, n_text=50)
    assert visual.tolist() == [0, 3, 5, 8]  # 1.0 wants 10 visual but only 8 exist
    assert (visual + text).tolist() == [10] * 4
    visual, text = split_quota(10, torch.tensor([0.0]), n_visual=30, n_text=4)
    assert (visual.item(), text.item()) == (6, 4)  # only 4 text tokens: the rest goes visual


def test_split_quota_in_spans_rounds_the_smaller_modality_up_to_whole_spans():
    shares = torch.tensor([0.0, 0.025, 0.05, 0.5, 0.93, 1.0])
    visual, text = split_quota(100, shares, n_visual=200, n_text=200, unit=8)
    # 2.5 and 5 visual slots become one whole span; 7 text slots (at 0.93) become one span too;
    # no mass stays nothing; the larger side takes what is left
    assert visual.tolist() == [0, 8, 8, 50, 92, 100]  # an even split stays even
    assert (visual + text).tolist() == [100] * 6
    visual, _ = split_quota(100, torch.tensor([0.16]), n_visual=200, n_text=200, unit=8)
    assert visual.item() == 16  # 16 slots are whole spans already: not rounded past them
    visual, _ = split_quota(100, torch.tensor([0.025]), n_visual=5, n_text=200, unit=8)
    assert visual.item() == 5  # fewer picture tokens than a span: only those
    visual, _ = split_quota(12, torch.tensor([0.3, 0.7]), n_visual=200, n_text=200, unit=8)
    assert visual.tolist() == [4, 8]  # a whole span would outgrow the other side: 3.6 stays 4 (12 - 3.6 -> 8)


def test_split_quota_nearest_rounds_the_smaller_quota_to_the_nearest_whole_span():
    shares = torch.tensor([0.0, 0.025, 0.05, 0.5, 0.93, 1.0])
    visual, text = split_quota(100, shares, n_visual=200, n_text=200, unit=8, nearest=True)
    # 2.5 slots (under half a span) keep none, 5 keep a span; 7 text slots (at 0.93) keep a span
    assert visual.tolist() == [0, 0, 8, 48, 92, 100]  # 50 -> 48: the nearest whole span
    assert (visual + text).tolist() == [100] * 6
    with pytest.raises(ValueError, match="mpa_quota"):
        MadaKV(mpa_quota="round")


def test_madakv_quota_in_spans_keeps_a_low_mass_picture_span_whole():
    # pictures draw 3 % of the mass: by tokens they get 3 of 100 slots, in spans a whole span of 8
    n = 532
    psi = torch.full((1, 1, n), 0.97 / 508)  # 508 text tokens before the window of 8
    tags = torch.zeros(n, dtype=torch.int8)
    tags[200:216] = 1
    psi[0, 0, 200:216] = torch.linspace(0.003, 0.0008, 16)  # the picture's first half scores higher
    psi[0, 0, 200:216] *= 0.03 / psi[0, 0, 200:216].sum()
    picture = slice(200, 216)
    by_tokens, by_spans = (MadaKV(hcc=False, budget=100 / n, mpa_quota=q).select(psi, tags)[0][0]
                           for q in ("tokens", "spans"))
    kept = [((k >= 200) & (k < 216)).sum().item() for k in (by_tokens, by_spans)]
    assert kept == [3, 8] and by_tokens.numel() == by_spans.numel()
    assert set(range(200, 208)) <= set(by_spans.tolist())
    assert picture.start in by_tokens.tolist()
    with pytest.raises(ValueError, match="mpa_quota"):
        MadaKV(mpa_quota="items")


# ---- contracts every policy keeps ---------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("budget", [0.05, 0.2, 0.5, 100])
def test_equal_counts_per_head_and_target_ratio(name, budget):
    scores, tags = scores_and_tags()
    policy = make_policy(name, budget=budget, window=16)
    keep = policy.select(scores, tags)
    n = tags.numel()
    kept = policy.kept_tokens(n)
    total = 0
    for layer_keep in keep:
        heads, count = layer_keep.shape
        assert heads == 4
        assert (layer_keep.diff(dim=1) > 0).all(), "indices sorted and unique"
        assert layer_keep.min() >= 0 and layer_keep.max() < n
        assert (layer_keep[:, -min(16, kept):] == torch.arange(n - min(16, kept), n)).all(), "window kept"
        total += heads * count
    assert total == kept * 4 * len(keep), "achieved ratio == target"


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_budget_covering_the_prompt_evicts_nothing(name):
    scores, tags = scores_and_tags(n=50, images=((5, 20),))
    assert make_policy(name, budget=1.0, window=8).select(scores, tags) is None
    assert make_policy(name, budget=60, window=8).select(scores, tags) is None


def test_window_longer_than_budget_keeps_only_the_window():
    scores, tags = scores_and_tags(n=200)
    keep = SnapKV(budget=0.05, window=32).select(scores, tags)  # 10 tokens < window
    assert all(k.shape[1] == 32 for k in keep)


def test_bad_settings_say_what_is_wrong():
    with pytest.raises(ValueError, match="ratio must be in"):
        MadaKV(budget=1.5)
    with pytest.raises(ValueError, match="smaller than the budget"):
        SnapKV(budget=32, window=32)
    with pytest.raises(ValueError, match="unknown eviction policy"):
        make_policy("fastkv")
    with pytest.raises(ValueError, match="unknown option"):
        make_policy("snapkv", theta=0.5)
    with pytest.raises(ValueError, match="odd"):
        SnapKV(kernel_size=4)
    with pytest.raises(ValueError, match="hcc_variant must be one of paper, balanced"):
        MadaKV(hcc_variant="greedy")
    with pytest.raises(ValueError, match="hcc_mix must be in"):
        MadaKV(hcc_variant="balanced", hcc_mix=1.5)
    with pytest.raises(ValueError, match="pool must be an odd integer"):
        MadaKV(pool=4)
    with pytest.raises(ValueError, match="sinks must be an integer"):
        MadaKV(sinks=-1)


# ---- policy-specific behaviour ------------------------------------------------------------------
def test_streamingllm_keeps_exactly_sinks_and_recent():
    scores, tags = scores_and_tags()
    policy = StreamingLLM(budget=0.1, window=8, sinks=4)
    keep = policy.select(None, tags, num_layers=3, num_kv_heads=2)
    n, kept = 300, policy.kept_tokens(300)
    expected = torch.cat([torch.arange(4), torch.arange(n - (kept - 4), n)])
    assert len(keep) == 3
    for layer_keep in keep:
        assert (layer_keep == expected).all()


@pytest.mark.parametrize("name", ["madakv", "snapkv", "h2o", "pyramidkv"])
def test_sinks_are_kept_by_every_head_inside_the_budget(name):
    """The first tokens stay whatever their scores (here the lowest of all; a layer whose budget
    is smaller keeps as many as it can), the per-layer counts do not change, and the rest is what
    the policy picks among the other tokens."""
    scores, tags = scores_and_tags()
    scores[..., :6] = 0.0  # the sinks would never win on their scores
    plain = make_policy(name, budget=0.1, window=8)
    with_sinks = make_policy(name, budget=0.1, window=8, sinks=6)
    n = scores.shape[-1]
    tail = plain.protected_tail(plain.kept_tokens(n))
    keep, reference = with_sinks.select(scores, tags), plain.select(scores, tags)
    for layer, (layer_keep, layer_reference) in enumerate(zip(keep, reference)):
        assert layer_keep.shape == layer_reference.shape
        count = layer_keep.shape[1] - tail  # selectable tokens this layer keeps
        sinks = min(6, count)
        assert (layer_keep[:, :sinks] == torch.arange(sinks)).all()
        assert not (layer_reference[:, :sinks] < sinks).all(), "without sinks these tokens are not kept"
        rest = with_sinks.choose(scores[layer, :, sinks:n - tail].float(), tags[sinks:n - tail], count - sinks)
        assert torch.equal(layer_keep[:, sinks:count], rest.nonzero()[:, 1].view(rest.shape[0], -1) + sinks)


def test_snapkv_pooling_keeps_neighbours_of_a_peak():
    psi = torch.zeros(1, 1, 200)
    psi[0, 0, 100] = 10.0
    tags = torch.zeros(200, dtype=torch.int8)
    keep = SnapKV(budget=7 + 8, window=8, kernel_size=7).select(psi, tags)[0][0]
    assert set(range(97, 104)) <= set(keep.tolist())
    unpooled = SnapKV(budget=1 + 8, window=8, kernel_size=1).select(psi, tags)[0][0]
    assert 100 in unpooled.tolist()


def test_madakv_pooling_keeps_a_span_within_its_modality():
    """pool=5 (spans off): the neighbours of a text peak rank with it, but never the image tokens next to it."""
    psi = torch.full((1, 2, 200), 0.01)
    psi[0, :, 100] = 10.0  # a text peak right after an image run [90, 100)
    psi[0, :, 150] = 1.0   # and a weaker text peak inside text
    tags = torch.zeros(200, dtype=torch.int8)
    tags[90:100] = 1
    policy = MadaKV(budget=12 + 8, window=8, pool=5, hcc=False, mpa=False, span=1)
    ranked = policy.rank_scores(psi[0], tags)
    assert (ranked[:, 98:100] == 0.01).all() and (ranked[:, 100:103] == 10.0).all()
    assert (ranked[:, 148:153] == 1.0).all()
    keep = set(policy.select(psi, tags)[0][0].tolist())
    assert set(range(100, 103)) | set(range(148, 153)) <= keep and not keep & set(range(90, 100))
    # with MPA too, the modality shares come from the raw scores and the pooled ones pick inside
    with_mpa = set(MadaKV(budget=12 + 8, window=8, pool=5, hcc=False, span=1).select(psi, tags)[0][0].tolist())
    assert set(range(100, 103)) <= with_mpa
    plain = set(MadaKV(budget=12 + 8, window=8, hcc=False, mpa=False, span=1).select(psi, tags)[0][0].tolist())
    assert not set(range(101, 103)) <= plain or not set(range(148, 153)) <= plain  # pooling made the difference


def test_span_ranks_order_whole_spans_by_their_sum_inside_modality_runs():
    psi = torch.zeros(2, 24)
    psi[:, 4:8] = 0.2       # text span [4, 8): sum 0.8, no token above 0.2
    psi[:, 21] = 0.5        # a lone peak: its span [20, 24) sums to 0.5
    psi[1, 13] = 0.9        # head 1: a peak in the image run [10, 14), its own span
    visual = torch.zeros(24, dtype=torch.bool)
    visual[10:14] = True    # runs: [0, 10) text -> spans [0,4) [4,8) [8,10); [10, 14) image; [14, 24) text
    ranks = span_ranks(psi, visual, 4)
    top4 = topk_mask(ranks, torch.ones(24, dtype=torch.bool), torch.tensor([4, 4]))
    assert top4[0].nonzero().flatten().tolist() == [4, 5, 6, 7]   # the span beats the higher lone peak
    assert top4[1].nonzero().flatten().tolist() == [10, 11, 12, 13]  # the image run is a span of its own
    # a cut through a span takes its best tokens first, then the next span's
    top5 = topk_mask(ranks, torch.ones(24, dtype=torch.bool), torch.tensor([5, 6]))
    assert top5[0].nonzero().flatten().tolist() == [4, 5, 6, 7, 21]
    assert top5[1].nonzero().flatten().tolist() == [4, 5, 10, 11, 12, 13]
    assert torch.equal(span_ranks(psi, visual, 1), psi)


def test_madakv_span_keeps_a_low_scoring_number_next_to_the_words_that_name_it():
    """A pass-key-like fact: the words before a number draw the question's attention, the
    digits do not; token top-k keeps the words only, span ranking keeps the number with them."""
    n = 400
    gen = torch.Generator().manual_seed(0)
    psi = torch.rand(1, 3, n, generator=gen) * 0.01
    psi[0, :, 200:203] = 0.3                 # "pass key is"
    psi[0, :, 203:208] = 0.005               # the five digits (spans of 8 from 0: [200, 208) holds all)
    psi[0, :, 300:310] = 0.02                # a few moderately attended tokens elsewhere
    tags = torch.zeros(n, dtype=torch.int8)
    digits = set(range(203, 208))
    plain = set(MadaKV(budget=8 + 16, hcc=False, span=1).select(psi, tags)[0][0].tolist())
    spans = set(MadaKV(budget=8 + 16, hcc=False, span=8).select(psi, tags)[0][0].tolist())
    assert not digits <= plain and digits <= spans
    # pooling first, then spans over the pooled scores: a span next to the words wins too
    pooled = set(MadaKV(budget=8 + 16, hcc=False, span=8, pool=3).select(psi, tags)[0][0].tolist())
    assert digits <= pooled
    with pytest.raises(ValueError, match="span must be"):
        MadaKV(span=0)


def test_madakv_coverage_split_gives_a_flat_low_mass_modality_its_needed_share():
    """Pictures drawing 3 % of a head's mass spread over many tokens: the paper's split gives
    them ~3 % of the slots, the coverage split about their share of the tokens needed to cover
    theta of each modality's mass."""
    n = 500
    psi = torch.zeros(1, 2, n)
    tags = torch.zeros(n, dtype=torch.int8)
    tags[100:164] = 1                             # 64 picture tokens
    psi[0, :, 100:164] = 0.03 / 64                # flat, 3 % of the mass
    psi[0, :, 300:310] = 0.097                    # text: 97 % on ten tokens
    psi[0, 1, 300:310] = 0.0
    psi[0, 1, :100] = 0.97 / 100                  # head 1: text mass spread over 100 tokens
    paper, coverage = MadaKV(hcc=False), MadaKV(hcc=False, mpa_split="coverage", theta=0.9)
    selectable, selectable_tags = psi[0, :, : n - 8], tags[: n - 8]
    assert torch.allclose(paper.visual_share(selectable, selectable_tags), torch.tensor([0.03, 0.03]))
    share = coverage.visual_share(selectable, selectable_tags)
    # head 0: pictures need 58 tokens (90 % of 64 flat ones), text 9: 58 / 67; head 1: 58 / (58 + 90)
    assert torch.allclose(share, torch.tensor([58 / 67, 58 / 148]))
    keep = coverage.select(psi, tags)
    assert keep is not None and keep[0].shape == (2, int(0.2 * n + 0.5))
    with pytest.raises(ValueError, match="mpa_split"):
        MadaKV(mpa_split="tokens")
    with pytest.raises(ValueError, match="value_weighted"):
        SnapKV(value_weighted="yes")


def test_h2o_scores_with_every_query_and_keeps_half_recent():
    policy = H2O(budget=0.2, window=8)
    assert policy.score_queries(300) == 300
    assert policy.score_queries(10_000) == 4096  # bounded: scoring is quadratic in the scored queries
    assert H2O(budget=0.2, window=8, max_queries=0).score_queries(10_000) == 10_000
    with pytest.raises(ValueError, match="max_queries"):
        H2O(max_queries=-1)
    scores, tags = scores_and_tags()
    keep = policy.select(scores, tags)[0]
    kept = policy.kept_tokens(300)
    assert (keep[:, -kept // 2:] == torch.arange(300 - kept // 2, 300)).all()


def test_lookm_evicts_images_first():
    scores, tags = scores_and_tags()
    scores[:, :, tags.bool()] += 10.0  # images get far more attention, yet text goes first
    keep = LookM(budget=0.2, window=8).select(scores, tags)
    n_text_selectable = int((tags[:300 - 30] == 0).sum())
    for layer_keep in keep:
        assert not tags[layer_keep[:, :-30]].bool().any()  # budget 60 < text tokens available
    assert n_text_selectable > 60


def test_pyramidkv_budgets_fall_linearly_and_keep_the_mean():
    scores, tags = scores_and_tags(num_layers=8, n=1000, images=((100, 500),))
    policy = PyramidKV(budget=0.2, window=16, beta=20)
    budgets = policy.layer_budgets(scores[..., :984], tags[:984], 200 - 16)
    assert budgets == sorted(budgets, reverse=True)
    assert sum(budgets) == 8 * 184
    assert budgets[-1] == pytest.approx(184 / 20, abs=1) and budgets[0] == pytest.approx(2 * 184 - 184 / 20, abs=1)


def test_pyramidkv_leaves_no_layer_or_layer_bucket_empty_at_small_budgets():
    """Without a protected tail (window 0), a pyramid's last layer of base / beta < 0.5 tokens used
    to round to none: a KV-cache group of such layers held no prompt token, which vLLM cannot serve
    (its workers reported [10, 0] and fell back to uniform counts)."""
    tags = torch.zeros(300, dtype=torch.int8)
    for layers, kept, buckets in ((2, 5, 2), (4, 2, 2), (4, 1, 4), (30, 3, 3)):
        policy = PyramidKV(budget=kept / 300, window=0, layer_buckets=buckets)
        budgets = policy.plan_budgets(torch.rand(layers, 2, 300), tags, layers)
        assert min(budgets) >= 1 and sum(budgets) == kept * layers, (layers, kept, budgets)
        assert budgets == sorted(budgets, reverse=True)


# ---- MadaKV: MPA and HCC ------------------------------------------------------------------------
def head_preferring(visual_heads, n=400, images=((50, 250),), heads=4, num_layers=2, seed=0):
    """Scores where the listed heads put 80 % of their mass on images, the others on text."""
    scores, tags = scores_and_tags(num_layers, heads, n, images, seed)
    vis = tags.bool()
    for h in range(heads):
        share = 0.8 if h in visual_heads else 0.2
        s = scores[:, h]
        s[:, vis] *= share / s[:, vis].sum(-1, keepdim=True)
        s[:, ~vis] *= (1 - share) / s[:, ~vis].sum(-1, keepdim=True)
    return scores, tags


@pytest.mark.parametrize("quota", ["floors", "floor"])
def test_madakv_quota_floors_give_a_sub_span_quota_no_slots_but_keep_a_low_mass_modality_floor(quota):
    # pictures draw 3 % of the mass: at 36 selectable slots their quota (~1 slot) is below one
    # span, so the floors keep what MPA off keeps, while "spans" spends a whole span on the picture
    n, window = 532, 12
    generator = torch.Generator().manual_seed(0)
    psi = torch.rand((1, 1, n), generator=generator)
    tags = torch.zeros(n, dtype=torch.int8)
    tags[200:264] = 1
    psi[0, 0, :n - window][tags[:n - window] == 0] *= 0.97 / psi[0, 0, :n - window][tags[:n - window] == 0].sum()
    psi[0, 0, 200:264] *= 0.03 / psi[0, 0, 200:264].sum()
    budget = (36 + window) / n
    floors, spans, off = (MadaKV(hcc=False, window=window, budget=budget, **opts).select(psi, tags)[0][0]
                          for opts in ({"mpa_quota": quota}, {"mpa_quota": "spans"}, {"mpa": False}))
    assert floors.numel() == spans.numel() == off.numel() == 36 + window
    assert torch.equal(floors, off)
    assert tags[spans].sum() == 8 and tags[floors].sum() == 0
    # pictures draw 90 % of the mass spread over many patches that each outscore the text tokens:
    # MPA off keeps no text at all, the floors keep the text's whole span (10 % of 100 slots -> 8)
    psi = torch.full((1, 1, n), 0.0)
    tags = torch.zeros(n, dtype=torch.int8)
    tags[:400] = 1
    psi[0, 0, :400] = 0.9 / 400
    psi[0, 0, 400:n - window] = 0.085 / 112
    psi[0, 0, 440:448] = 0.015 / 8  # the text's best span, below every picture span (0.018)
    budget = (100 + window) / n
    floors, off = (MadaKV(hcc=False, window=window, budget=budget, **opts).select(psi, tags)[0][0]
                   for opts in ({"mpa_quota": quota}, {"mpa": False}))
    kept_text = [set(k.tolist()) & set(range(400, n - window)) for k in (floors, off)]
    assert kept_text[0] == set(range(440, 448)) and kept_text[1] == set()


def test_madakv_quota_floor_lets_a_strong_picture_span_compete_where_floors_fill_up_with_text():
    # text draws 97 % of the mass, flat; the pictures' 3 % sits on one span that outscores every
    # text span. With a floor for each modality the text's (96 of 100 slots) leaves the picture 4
    # tokens; with a floor for the smaller one only, plain top-k keeps its whole span.
    n, window = 532, 12
    psi = torch.zeros((1, 1, n))
    tags = torch.zeros(n, dtype=torch.int8)
    tags[200:264] = 1
    psi[0, 0, :n - window] = 0.97 / (n - window - 64)
    psi[0, 0, 200:264] = 0
    psi[0, 0, 200:208] = 0.03 / 8
    budget = (100 + window) / n
    both, smaller = (MadaKV(hcc=False, window=window, budget=budget, mpa_quota=q).select(psi, tags)[0][0]
                     for q in ("floors", "floor"))
    assert tags[both].sum() == 4 and set(range(200, 208)) <= set(smaller.tolist())


def test_madakv_quota_caps_let_a_sub_span_quota_compete_and_keep_a_strong_modality_to_its_share():
    n, window = 532, 12
    tags = torch.zeros(n, dtype=torch.int8)
    tags[200:264] = 1
    budget = (36 + window) / n

    def kept(psi, **opts):
        return MadaKV(hcc=False, window=window, budget=budget, **opts).select(psi, tags)[0][0]

    # pictures draw 3 % of the mass, flat: their quota (~1 of 36 slots) rounds up to a ceiling of one
    # span, which their spans do not earn; "spans" would spend a whole span on them anyway
    generator = torch.Generator().manual_seed(0)
    psi = torch.rand((1, 1, n), generator=generator)
    text = tags[:n - window] == 0
    psi[0, 0, :n - window][text] *= 0.97 / psi[0, 0, :n - window][text].sum()
    psi[0, 0, 200:264] *= 0.03 / psi[0, 0, 200:264].sum()
    caps, spans, off = kept(psi, mpa_quota="caps"), kept(psi, mpa_quota="spans"), kept(psi, mpa=False)
    assert caps.numel() == spans.numel() == 36 + window
    assert torch.equal(caps, off) and tags[caps].sum() == 0 and tags[spans].sum() == 8
    # the same 3 % on one picture span that outscores every text span: it is kept whole (its ceiling)
    psi[0, 0, 200:264] = 0
    psi[0, 0, 200:208] = 0.03 / 8
    assert set(range(200, 208)) <= set(kept(psi, mpa_quota="caps").tolist())
    # pictures draw 90 % of the mass, spread so that every picture span outscores every text span:
    # at 100 slots MPA off keeps pictures only; under caps they stop at their ceiling (90 -> 96, whole
    # spans) and the text keeps its best tokens in the rest
    budget = (100 + window) / n
    psi = torch.zeros((1, 1, n))
    tags[264:400] = 1  # 200 picture tokens
    psi[0, 0, :n - window] = 0.1 / (n - window - 200)
    psi[0, 0, 200:400] = 0.9 / 200
    caps, off = kept(psi, mpa_quota="caps"), kept(psi, mpa=False)
    assert tags[off].sum() == 100
    assert tags[caps].sum() == 96


def test_mpa_quota_follows_each_heads_modality_preference():
    scores, tags = head_preferring(visual_heads={0, 2})
    policy = MadaKV(budget=0.25, window=16, hcc=False, span=1)  # single tokens: the paper's top-k inside a modality
    keep = policy.select(scores, tags)
    n_select = 400 - 16
    selectable = policy.kept_tokens(400) - 16
    vis = tags.bool()
    for layer, layer_keep in enumerate(keep):
        sel = layer_keep[:, :-16]
        for h in range(4):
            w = scores[layer, h, :n_select]
            share = float(w[vis[:n_select]].sum() / w.sum())
            n_vis_kept = int(vis[sel[h]].sum())
            assert abs(n_vis_kept - selectable * share) <= 1, (h, n_vis_kept, selectable * share)
            # inside each modality: the top tokens by score
            for member, count in ((vis[:n_select], n_vis_kept), (~vis[:n_select], selectable - n_vis_kept)):
                top = w.masked_fill(~member, -1).topk(count).indices.sort().values
                chosen = sel[h][member[sel[h]]]
                assert torch.equal(chosen, top)


def test_mpa_quota_capped_by_available_tokens():
    scores, tags = head_preferring(visual_heads={0, 1, 2, 3}, images=((50, 60),))  # only 10 image tokens
    keep = MadaKV(budget=0.25, window=16, hcc=False).select(scores, tags)
    for layer_keep in keep:
        assert (tags[layer_keep].bool().sum(dim=1) == 10).all()


def test_no_images_means_text_only_selection():
    scores, tags = scores_and_tags(images=())
    keep = MadaKV(budget=0.2, window=16).select(scores, tags)
    plain = MadaKV(budget=0.2, window=16, mpa=False).select(scores, tags)
    for a, b in zip(keep, plain):
        assert torch.equal(a, b)


@pytest.mark.parametrize("variant", ["paper", "balanced"])
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("budget", [0.05, 0.2, 0.5])
def test_hcc_conserves_total_and_respects_floor(seed, budget, variant):
    num_layers, n = 12, 800
    gen = torch.Generator().manual_seed(seed)
    # layers alternate between spread and concentrated attention: unequal demands
    sharpness = torch.tensor([1.0 if layer % 3 else 8.0 for layer in range(num_layers)])[:, None, None]
    scores = torch.rand(num_layers, 4, n, generator=gen) ** sharpness
    tags = torch.zeros(n, dtype=torch.int8)
    tags[100:500] = 1
    policy = MadaKV(budget=budget, window=16, hcc_variant=variant)
    per_layer = policy.kept_tokens(n) - 16
    budgets = policy.layer_budgets(scores[..., : n - 16], tags[: n - 16], per_layer)
    floor = min(per_layer, max(1, round(0.01 * (n - 16))))
    assert abs(sum(budgets) - per_layer * num_layers) <= num_layers
    assert min(budgets) >= floor - 1
    assert max(budgets) <= n - 16
    assert len(set(budgets)) > 1, "demands differ, so budgets should too"


def test_hcc_keeps_demand_and_later_layers_pay_back():
    scores, tags = head_preferring(visual_heads={0}, num_layers=4, n=600, images=((50, 350),))
    scores[0] = 1.0  # layer 0: uniform attention, high demand
    policy = MadaKV(budget=0.2, window=16, hcc_variant="paper")
    per_layer = policy.kept_tokens(600) - 16
    budgets = policy.layer_budgets(scores[..., :584], tags[:584], per_layer)
    demand0 = policy.layer_demand(scores[0, :, :584], tags[:584])
    assert budgets[0] > per_layer and budgets[0] == min(round(demand0), budgets[0])
    assert sum(budgets) == per_layer * 4


def test_balanced_hcc_follows_demand_and_never_starves_a_layer():
    scores, tags = head_preferring(visual_heads={0}, num_layers=4, n=600, images=((50, 350),))
    scores[0] = 1.0  # layer 0: uniform attention, by far the highest demand
    n_select = 584
    for mix in (0.0, 0.5, 1.0):
        policy = MadaKV(budget=0.2, window=16, hcc_variant="balanced", hcc_mix=mix)
        per_layer = policy.kept_tokens(600) - 16
        budgets = policy.layer_budgets(scores[..., :n_select], tags[:n_select], per_layer)
        demands = [policy.layer_demand(scores[layer, :, :n_select], tags[:n_select]) for layer in range(4)]
        assert sum(budgets) == per_layer * 4
        # each layer gets (1 - mix) of its share plus mix of the total in proportion to demand
        expected = [(1 - mix) * per_layer + mix * per_layer * 4 * d / sum(demands) for d in demands]
        assert all(abs(b - e) <= 1 for b, e in zip(budgets, expected)), (mix, budgets, expected)
        assert min(budgets) >= int((1 - mix) * per_layer)
    # the paper variant, on the same scores, lets layer 0 take more than the balanced one does
    paper = MadaKV(budget=0.2, window=16, hcc_variant="paper").layer_budgets(
        scores[..., :n_select], tags[:n_select], per_layer)
    balanced = MadaKV(budget=0.2, window=16).layer_budgets(  # the default variant
        scores[..., :n_select], tags[:n_select], per_layer)
    assert paper[0] > balanced[0] > per_layer and min(balanced) > min(paper)


def test_ablation_switches_change_the_selection():
    scores, tags = head_preferring(visual_heads={1}, num_layers=4)
    scores[0] = scores[0] ** 0.2  # flatter first layer
    variants = {(mpa, hcc): MadaKV(budget=0.2, window=16, mpa=mpa, hcc=hcc).select(scores, tags)
                for mpa, hcc in itertools.product([False, True], repeat=2)}
    uniform = [k.shape[1] for k in variants[(True, False)]]
    assert len(set(uniform)) == 1
    assert [k.shape[1] for k in variants[(True, True)]] != uniform
    assert any(not torch.equal(a, b) for a, b in zip(variants[(True, False)], variants[(False, False)]))


# ---- layer buckets (vLLM's KV-cache groups) -----------------------------------------------------
@pytest.mark.parametrize("budgets, buckets", [([50, 40, 30, 20, 10, 0], 3), ([7, 9, 11, 3], 2), ([5, 5, 6], 3),
                                              ([100, 1, 1, 1, 1, 1], 2), ([13, 2, 8, 30, 4, 9], 1)])
def test_bucket_budgets_are_equal_inside_a_bucket_and_keep_the_total(budgets, buckets):
    from madakv_vllm.policies.base import bucket_budgets

    out = bucket_budgets(budgets, buckets, cap=1000)
    size = len(budgets) // buckets
    runs = [out[b * size:(b + 1) * size] for b in range(buckets)]
    assert all(len(set(run)) == 1 for run in runs)
    assert sum(budgets) - size < sum(out) <= sum(budgets)  # never more memory, less only by rounding
    for b, run in enumerate(runs):  # each bucket keeps its layers' mean, rounded
        assert abs(run[0] - sum(budgets[b * size:(b + 1) * size]) / size) < 1
    if buckets == len(budgets):
        assert out == budgets
    with pytest.raises(ValueError, match="equal buckets"):
        bucket_budgets([1, 2, 3], 2, cap=10)


@pytest.mark.parametrize("budgets, buckets, expected", [([10, 10, 0, 0], 2, [9, 9, 1, 1]),
                                                       ([6, 0, 0, 0, 0, 0], 3, [1] * 6),
                                                       ([3, 0, 0, 0, 0, 0], 3, [1, 1, 0, 0, 0, 0])])
def test_bucket_budgets_leave_no_bucket_empty_while_the_total_allows(budgets, buckets, expected):
    """A bucket is one of vLLM's KV-cache groups, which must hold a token: one of the others'
    goes to it (the last case has 1 token for 3 buckets, so two stay empty)."""
    from madakv_vllm.policies.base import bucket_budgets

    assert bucket_budgets(budgets, buckets, cap=1000) == expected


@pytest.mark.parametrize("policy", [MadaKV(budget=0.2, window=16), PyramidKV(budget=0.2, window=16)])
def test_layer_buckets_shape_the_selection(policy):
    scores, tags = scores_and_tags(num_layers=6)
    scores = scores ** torch.arange(1, 7).view(6, 1, 1)  # later layers focus: HCC demands differ
    per_layer = policy.plan_budgets(scores, tags, 6)
    assert len(set(per_layer)) > 1
    policy.layer_buckets = 3
    bucketed = policy.plan_budgets(scores, tags, 6)
    assert bucketed == [bucketed[0]] * 2 + [bucketed[2]] * 2 + [bucketed[4]] * 2 and len(set(bucketed)) > 1
    keep = policy.select(scores, tags)
    tail = policy.protected_tail(policy.kept_tokens(300))
    assert [k.shape[1] - tail for k in keep] == bucketed
    policy.layer_buckets = 1
    assert len({k.shape[1] for k in policy.select(scores, tags)}) == 1


def test_demands_averaged_across_ranks_decide_the_budgets():
    """Tensor parallelism: the `average` hook replaces a rank's own layer demands."""
    scores, tags = scores_and_tags(num_layers=4)
    policy = MadaKV(budget=0.2, window=16)
    own = policy.plan_budgets(scores, tags, 4)
    flat = policy.plan_budgets(scores, tags, 4, average=lambda demands: torch.ones_like(demands))
    assert own != flat and len(set(flat)) == 1
    assert policy.plan_budgets(scores, tags, 4, average=lambda demands: demands) == own


# ---- between prefill chunks: heads hold different tokens ---------------------------------------
def random_present(scores, held, tail, seed):
    """Per layer and head, `held` tokens still held: the last `tail` and a random rest."""
    num_layers, heads, n = scores.shape
    gen = torch.Generator().manual_seed(seed)
    present = torch.zeros(num_layers, heads, n, dtype=torch.bool)
    present[..., n - tail:] = True
    for layer in range(num_layers):
        for head in range(heads):
            present[layer, head, torch.randperm(n - tail, generator=gen)[: held - tail]] = True
    return present


@pytest.mark.parametrize("policy", [
    MadaKV(budget=0.1, window=8, span=1, hcc=False), MadaKV(budget=0.1, window=8, span=1, mpa_split="coverage",
                                                            hcc=False),
    MadaKV(budget=0.1, window=8, span=1, mpa=False, hcc=False), SnapKV(budget=0.1, window=8, kernel_size=1),
    StreamingLLM(budget=0.1, window=8, sinks=0), StreamingLLM(budget=0.1, window=8),
    MadaKV(budget=0.1, window=8, span=1, hcc=False, sinks=4)],
    ids=lambda p: f"{p.name} {getattr(p, 'mpa_split', '')} sinks {p.sinks}")
def test_selection_among_held_tokens_equals_selection_on_each_heads_compacted_cache(policy):
    """`present` masks are the logical view of a compacted cache: per head, selecting among the
    held tokens picks what the same policy picks on that head's tokens gathered densely. Sinks
    are then the first tokens a head holds: an earlier compaction may have dropped the prompt's
    first ones (a budget under the sinks), and a head must never keep a token it no longer has."""
    scores, tags = scores_and_tags(num_layers=3, heads=4, n=300)
    kept, held = 30, 90
    present = random_present(scores, held, policy.protected_tail(kept), seed=1)
    keep = policy.select(scores, tags, kept=kept, present=present)
    for layer, layer_keep in enumerate(keep):
        assert layer_keep.shape == (4, kept)
        for head in range(4):
            assert present[layer, head, layer_keep[head]].all()
            mine = present[layer, head].nonzero()[:, 0]  # the head's compacted cache, in order
            dense = policy.select(scores[layer:layer + 1, head:head + 1, mine], tags[mine], kept=kept)
            assert mine[dense[0][0]].tolist() == layer_keep[head].tolist()


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("sinks", [0, 4])
def test_no_policy_keeps_a_token_a_head_no_longer_holds(name, sinks):
    """Whatever a policy's rule (sinks, spans, layer shapes), a later compaction keeps only held
    tokens: the worker maps each kept token to its slot in the compacted cache, and a token it
    no longer has would map to another token's slot (or none)."""
    policy = make_policy(name, budget=0.1, window=8, sinks=sinks)
    scores, tags = scores_and_tags(num_layers=3, heads=4, n=300)
    for seed in range(3):  # the first tokens are held by some heads and not by others
        present = random_present(scores, 90, policy.protected_tail(30), seed=seed)
        keep = policy.select(scores, tags, kept=30, present=present)
        for layer, layer_keep in enumerate(keep):
            for head in range(4):
                assert present[layer, head, layer_keep[head]].all(), (seed, layer, head)


def test_selection_among_held_tokens_keeps_sinks_tail_and_moves_budget_between_layers():
    scores, tags = scores_and_tags(num_layers=2, heads=3, n=400)
    policy = MadaKV(budget=0.1, window=8, sinks=4, hcc=True)
    kept, held = 40, 120
    gen = torch.Generator().manual_seed(2)
    present = torch.zeros(2, 3, 400, dtype=torch.bool)
    present[..., :4] = present[..., 392:] = True  # sinks and the window survive every compaction
    for layer in range(2):
        for head in range(3):
            present[layer, head, 4 + torch.randperm(388, generator=gen)[: held - 12]] = True
    keep = policy.select(scores, tags, kept=kept, present=present)
    assert sum(k.shape[1] for k in keep) == kept * 2  # HCC moves tokens between layers, the total stays
    for layer, layer_keep in enumerate(keep):
        assert layer_keep.shape[1] <= held
        for head in range(3):
            row = set(layer_keep[head].tolist())
            assert set(range(4)) <= row and set(range(392, 400)) <= row
            assert present[layer, head, layer_keep[head]].all()


def test_prefill_options_are_checked():
    assert MadaKV(budget=0.2).slack_tokens(100) == 50 and MadaKV(budget=0.2, prefill_slack=7).slack_tokens(100) == 7
    for bad in (dict(prefill_slack=-1), dict(prefill_slack="x"), dict(prefill_scores="question"),
                dict(during_prefill=1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            MadaKV(budget=0.2, **bad)
    with pytest.raises(ValueError, match="cannot evict during prefill"):
        H2O(budget=0.2, during_prefill=True)
