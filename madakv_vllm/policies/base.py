"""What every eviction policy shares: budget arithmetic, the protected window, per-head top-k.

A policy sees, for one request after prefill, per-layer per-KV-head token scores
`scores[L, H, N]` (attention from the last `score_queries(N)` prompt tokens, see
`madakv_kernels.window_scores`) and per-token modality tags, and returns per layer the sorted
token indices each head keeps, `[H, K_l]`. Every head of a layer keeps the same count K_l, so a
layer's cache stays rectangular (and pages densely). Subclasses override only what makes them
different: how tokens are ranked, how many each layer keeps, how a head picks inside a layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from madakv_kernels import keep_indices, topk_mask

MAX_TOKEN_COUNT = 2**31 - 1  # token counts beyond this are no real budget (and overflow int32 / msgpack)
PREFILL_SCORES = ("chunk", "running", "novelty", "ahead", "appended")  # scores between prefill chunks (during_prefill)


def budget_error(budget) -> str | None:
    """Why `budget` is not a valid budget, or None: a ratio in (0, 1] or a token count >= 1."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        return f"budget must be a number, got {budget!r}"
    if isinstance(budget, float) and not (0.0 < budget <= 1.0):
        return f"budget ratio must be in (0, 1], got {budget}"
    if isinstance(budget, int) and not 1 <= budget <= MAX_TOKEN_COUNT:
        return f"budget token count must be in [1, {MAX_TOKEN_COUNT}], got {budget}"
    return None


def probe_fits(point: int, prompt_len: int, probe: int, has_embeds) -> bool:
    """Whether the question's window (the prompt's last `probe` tokens) can run right after the
    prefill chunk ending at `point` to score it (`prefill_scores: appended`). In vLLM its rows
    ride on that chunk's step at the positions that follow it, so they must end before the prompt
    does, and the window must hold no image's or video's embeddings (`has_embeds(start, end)`):
    the probe's rows are run as text. Otherwise the chunk's own last queries score the point, on
    the HF path as in vLLM."""
    return probe > 0 and point + probe < prompt_len and not has_embeds(prompt_len - probe, prompt_len)


def distribute(targets: list[float], total: int, cap: int) -> list[int]:
    """Integers close to `targets`, each in [0, cap], summing to min(total, cap * len).

    Largest-remainder rounding, then any amount clipped by the cap goes to layers with room.
    """
    total = min(total, cap * len(targets))
    clipped = [min(max(t, 0.0), cap) for t in targets]
    out = [math.floor(t) for t in clipped]
    by_remainder = sorted(range(len(out)), key=lambda i: clipped[i] - out[i], reverse=True)
    i = 0
    while sum(out) < total:
        j = by_remainder[i % len(out)]
        if out[j] < cap:
            out[j] += 1
        i += 1
    while sum(out) > total:  # only when targets overshoot the total
        j = max(range(len(out)), key=lambda k: out[k])
        out[j] -= 1
    return out


def decode_point(cap: int, slack: int, queries: int, evicted_min: int, since: int) -> int:
    """The logical length after which a compaction during decode follows: when the layer holding
    the most (logical length - `evicted_min`) holds cap + slack, and never before `queries` tokens
    computed after `since` (the logical length of the last compaction) can score it."""
    return max(evicted_min + cap + slack, since + queries)


def max_pool_scores(psi: torch.Tensor, kernel: int, groups: list[torch.Tensor] | None = None) -> torch.Tensor:
    """1-D max pooling of [H, N] scores over `kernel` neighbouring tokens, so a hit's neighbours
    rank with it; with `groups` (bool masks over N), only neighbours of the same group count."""
    import torch.nn.functional as F

    if kernel == 1 or psi.shape[1] == 0:
        return psi

    def pool(x):
        return F.max_pool1d(x[:, None], kernel, stride=1, padding=kernel // 2)[:, 0]

    if groups is None:
        return pool(psi)
    pooled = psi.clone()
    for member in groups:
        pooled = torch.where(member, pool(psi.masked_fill(~member, float("-inf"))), pooled)
    return pooled


@dataclass
class EvictionPolicy:
    """Base policy. `budget`: ratio of the prompt length in (0, 1] or an absolute token count,
    per head and layer on average, window included. `window`: the proxy window (last prompt
    tokens), always kept and counted inside the budget. A budget that covers the prompt evicts
    nothing. `layer_buckets`: None = every layer keeps its own budget (PyramidKV, MadaKV's HCC);
    1 = every layer keeps the same count (vLLM with one KV-cache group: all layers share one
    block table); N = N equal buckets of consecutive layers, one count each (vLLM with N
    groups, `bucket_budgets`). `sinks`: the first prompt tokens every head keeps whatever their
    scores, inside the budget (StreamingLLM's attention sinks; 0 = none, the ranking decides).
    `value_weighted`: the scores the policy sees are the window attention times each token's
    value norm per head (`madakv_kernels.value_norms`; the HF path and vLLM's runner apply it).

    `during_prefill`: also evict between prefill chunks, so a request never holds more than its
    kept count + `prefill_slack` + one chunk (prompts larger than the KV pool fit). The slack is a
    ratio of the kept count (float) or a token count (int). Early chunks do not see the question:
    `prefill_scores` "appended" (the default) scores them with the queries of the prompt's last
    `window` tokens (the question, where it ends the prompt) run at their own positions right after
    the chunk, over what the request holds, then dropped (FINCH's rule; `probe_fits` says where it
    cannot, and the chunk's own queries score instead); "chunk" with each chunk's own last `window`
    queries (SnapKV in chunks); "running" with the mean of the window scores of every chunk that
    saw the token so far; "novelty" with each key's distance from the mean key (no query); "ahead"
    with the question's window run alone ("running", "novelty" and "ahead" on the HF path only).
    The compaction after the last chunk is the usual one (the question's window over the survivors).

    `decode_budget`: a cap on the tokens each head keeps per layer while the output grows (a
    ratio of the prompt or a token count; None = the output is never evicted). Once the layer
    holding the most reaches cap + `decode_slack` (a ratio of the cap or a token count; never less
    than the window), every layer is compacted back to the cap, scored by the last `window`
    generated tokens; prompt survivors and generated tokens compete under the same rule (the
    generated ones are text). See `decode_point`."""

    budget: float | int = 0.2
    window: int = 32
    layer_buckets: int | None = None  # vLLM sets it to its KV-cache group count
    sinks: int = 0
    value_weighted: bool = False
    during_prefill: bool = False
    prefill_slack: float | int = 0.5
    prefill_scores: str = "appended"
    decode_budget: float | int | None = None
    decode_slack: float | int = 0.25
    name: ClassVar[str] = "base"
    needs_scores: ClassVar[bool] = True  # StreamingLLM ranks by position only

    def __post_init__(self):
        if (err := budget_error(self.budget)) is not None:
            raise ValueError(f"{self.name}: {err}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or not 0 <= self.window <= MAX_TOKEN_COUNT:
            raise ValueError(f"{self.name}: window must be an integer in [0, {MAX_TOKEN_COUNT}], got {self.window!r}")
        if self.layer_buckets is not None and (isinstance(self.layer_buckets, bool) or
                                               not isinstance(self.layer_buckets, int) or self.layer_buckets < 1):
            raise ValueError(f"{self.name}: layer_buckets must be a positive integer or None, "
                             f"got {self.layer_buckets!r}")
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or not 0 <= self.sinks <= MAX_TOKEN_COUNT:
            raise ValueError(f"{self.name}: sinks must be an integer in [0, {MAX_TOKEN_COUNT}], got {self.sinks!r}")
        if not isinstance(self.value_weighted, bool):
            raise ValueError(f"{self.name}: value_weighted must be true or false, got {self.value_weighted!r}")
        if not isinstance(self.during_prefill, bool):
            raise ValueError(f"{self.name}: during_prefill must be true or false, got {self.during_prefill!r}")
        slack = self.prefill_slack
        if isinstance(slack, bool) or not isinstance(slack, (int, float)) or not 0 <= slack <= MAX_TOKEN_COUNT:
            raise ValueError(f"{self.name}: prefill_slack must be a ratio >= 0 of the kept count or a token count, "
                             f"got {self.prefill_slack!r}")
        if self.prefill_scores not in PREFILL_SCORES:
            raise ValueError(f"{self.name}: prefill_scores must be one of {', '.join(PREFILL_SCORES)}, "
                             f"got {self.prefill_scores!r}")
        if self.decode_budget is not None and (err := budget_error(self.decode_budget)) is not None:
            raise ValueError(f"{self.name}: decode_{err}")
        slack = self.decode_slack
        if isinstance(slack, bool) or not isinstance(slack, (int, float)) or not 0 <= slack <= MAX_TOKEN_COUNT:
            raise ValueError(f"{self.name}: decode_slack must be a ratio >= 0 of the decode budget or a token count, "
                             f"got {self.decode_slack!r}")
        if isinstance(self.budget, int) and self.window >= self.budget:
            raise ValueError(f"{self.name}: window ({self.window}) must be smaller than "
                             f"the budget ({self.budget} tokens)")

    # ---- budget arithmetic (the scheduler and the workers must agree on it) -----------------
    def kept_tokens(self, n: int) -> int:
        """Tokens each head keeps per layer on average for an n-token prompt (n = no eviction);
        never fewer than one, even when the budget rounds to zero tokens."""
        target = int(self.budget * n + 0.5) if isinstance(self.budget, float) else self.budget
        return min(n, max(target, min(self.window, n), 1))

    def protected_tail(self, kept: int) -> int:
        """Last prompt tokens every head keeps unconditionally."""
        return min(self.window, kept)

    def score_queries(self, n: int) -> int:
        """How many trailing prompt queries score the tokens (the proxy window)."""
        return min(max(self.window, 1), n)

    def question_probe(self, n: int) -> int:
        """With prefill_scores "appended": how many of an n-token prompt's last tokens (its
        question's window) run right after a chunk to score it; 0 otherwise."""
        appended = self.during_prefill and self.needs_scores and self.prefill_scores == "appended"
        return self.score_queries(n) if appended else 0

    def compaction_interval(self, chunk: int, n: int) -> int:
        """With during_prefill and prefill chunks of `chunk` tokens: compactions may follow every
        this many prompt tokens. The probe rides on the chunk's step, so both fit in `chunk`."""
        return chunk - self.question_probe(n)

    def slack_tokens(self, kept: int) -> int:
        """With during_prefill: tokens a request may hold beyond its kept count before the next
        compaction between prefill chunks."""
        return int(self.prefill_slack * kept + 0.5) if isinstance(self.prefill_slack, float) else self.prefill_slack

    def decode_cap(self, n: int) -> int | None:
        """With decode_budget: the tokens each head keeps per layer after a compaction during
        decode, for an n-token prompt (at least the window, so the scoring queries stay)."""
        if self.decode_budget is None:
            return None
        cap = int(self.decode_budget * n + 0.5) if isinstance(self.decode_budget, float) else self.decode_budget
        return max(cap, self.window, 1)

    def decode_point(self, n: int, evicted_min: int, since: int) -> int | None:
        """The logical length after which the next compaction during decode follows (None: the
        output is not evicted): when the layer holding the most (logical length - `evicted_min`)
        holds cap + slack, and never before `window` tokens computed after the last compaction
        (`since`: the logical length it was made at) can score it. The HF path and vLLM's
        scheduler and workers all decide with this."""
        cap = self.decode_cap(n)
        if cap is None:
            return None
        return decode_point(cap, self.decode_slack_tokens(cap), max(self.window, 1), evicted_min, since)

    def decode_interval(self, n: int) -> int:
        """Logical tokens between two compactions during decode, once the first one is made (the
        layer holding the most is back at the cap after each): the points are fixed from there."""
        return max(self.decode_slack_tokens(self.decode_cap(n)), self.window, 1)

    def decode_slack_tokens(self, cap: int) -> int:
        """Tokens beyond the cap a layer may hold during decode (at least one: a compaction always evicts)."""
        slack = int(self.decode_slack * cap + 0.5) if isinstance(self.decode_slack, float) else self.decode_slack
        return max(slack, 1)

    # ---- what subclasses specialise ------------------------------------------------------------
    def rank_scores(self, psi: torch.Tensor, modality_tags: torch.Tensor) -> torch.Tensor:
        """Scores used for ranking inside a layer: [H, n_select]."""
        return psi

    def layer_budgets(self, scores: torch.Tensor, modality_tags: torch.Tensor, per_layer: int) -> list[int]:
        """Selectable tokens per head for each layer (beyond the protected tail), from the
        selectable part of the scores [L, H, n_select]."""
        num_layers, _, n_select = scores.shape
        return self.budgets_from_demands(self.layer_demands(scores, modality_tags), per_layer, num_layers, n_select)

    def varies_by_layer(self) -> bool:
        """Whether this policy gives layers different budgets (then vLLM needs several groups)."""
        return False

    def layer_demands(self, scores: torch.Tensor, modality_tags: torch.Tensor) -> torch.Tensor | None:
        """The per-layer statistic the budgets depend on, [L] fp32, or None. It is a mean over
        heads, so tensor-parallel ranks (each with some heads) agree after averaging theirs."""
        return None

    def budgets_from_demands(self, demands: torch.Tensor | None, per_layer: int, num_layers: int,
                             n_select: int) -> list[int]:
        """Selectable tokens per head for each layer, summing to per_layer * num_layers."""
        return [per_layer] * num_layers

    def choose(self, psi: torch.Tensor, modality_tags: torch.Tensor, count: int,
               present: torch.Tensor | None = None) -> torch.Tensor:
        """Bool [H, n_select]: exactly `count` tokens per head. `present` (bool [H, n_select]):
        the tokens each head still holds after earlier compactions (None: all)."""
        heads, n_select = psi.shape
        member = torch.ones(n_select, dtype=torch.bool, device=psi.device) if present is None else present
        counts = torch.full((heads,), count, dtype=torch.long, device=psi.device)
        return topk_mask(self.rank_scores(psi, modality_tags), member, counts)

    # ---- the one entry point -------------------------------------------------------------------
    def plan_budgets(self, scores: torch.Tensor | None, modality_tags: torch.Tensor, num_layers: int,
                     average=None, kept: int | None = None, held: int | None = None) -> list[int]:
        """Selectable tokens per head for each layer (beyond the protected tail) for this prompt,
        equal inside each of `layer_buckets` buckets. `average`: makes the [L] layer demands agree
        across tensor-parallel ranks. `kept`: the count to keep (default: the budget of this
        prompt); `held`: tokens each head holds now, when earlier compactions left fewer than the
        prompt (no layer can keep more; absent tokens must score 0)."""
        n = modality_tags.numel()
        kept = self.kept_tokens(n) if kept is None else kept
        tail = self.protected_tail(kept)
        n_select = (n if held is None else held) - tail
        if self.layer_buckets == 1 or not self.varies_by_layer():
            return [kept - tail] * num_layers
        demands = None
        if scores is not None:
            demands = self.layer_demands(scores[..., :n_select].float(), modality_tags[:n_select])
        if demands is not None and average is not None:
            demands = average(demands)
        budgets = self.budgets_from_demands(demands, kept - tail, num_layers, n_select)
        return budgets if self.layer_buckets is None else bucket_budgets(budgets, self.layer_buckets, n_select)

    def select(self, scores: torch.Tensor | None, modality_tags: torch.Tensor, num_layers: int | None = None,
               num_kv_heads: int | None = None, budgets: list[int] | None = None, kept: int | None = None,
               present: torch.Tensor | None = None) -> list[torch.Tensor] | None:
        """Keep indices per layer ([H, K_l], sorted), or None when nothing is evicted.

        scores: [L, H, N] float (None for policies with needs_scores False, then pass
        num_layers and num_kv_heads); modality_tags: [N] (0 text, 1 image, 2 video);
        budgets: selectable tokens per layer when already planned (`plan_budgets`).
        Between prefill chunks (during_prefill): `kept`, the count to keep (the whole prompt's);
        `present` [L, H, N] bool, the tokens each head still holds, the same number in every
        head of a layer (positions stay logical; the caller maps them to its compacted cache,
        `madakv_kernels.physical_indices`).
        """
        n = modality_tags.numel()
        if scores is None:
            if self.needs_scores:
                raise ValueError(f"{self.name} needs attention scores")
            scores = torch.zeros(num_layers, num_kv_heads, n, device=modality_tags.device)
        if scores.shape[-1] != n:
            raise ValueError(f"scores cover {scores.shape[-1]} tokens but there are {n} modality tags")
        held = n if present is None else int(present[:, 0].sum(dim=-1).max())  # layers may differ (decode)
        kept = self.kept_tokens(n) if kept is None else kept
        if kept >= held:
            return None
        n_select = n - self.protected_tail(kept)
        if present is not None:  # tokens a head no longer holds weigh nothing (mass, demands)
            scores = scores.masked_fill(~present, 0.0)
        selectable = scores[..., :n_select].float()
        tags = modality_tags[:n_select]
        if budgets is None:
            budgets = self.plan_budgets(scores, modality_tags, selectable.shape[0], kept=kept,
                                        held=None if present is None else held)
        return [keep_indices(self.choose_after_sinks(selectable[layer], tags, count,
                                                     None if present is None else present[layer, :, :n_select]),
                             n, n_select)
                for layer, count in enumerate(budgets)]

    def choose_after_sinks(self, psi: torch.Tensor, modality_tags: torch.Tensor, count: int,
                           present: torch.Tensor | None = None) -> torch.Tensor:
        """`choose`, with the first `sinks` tokens each head holds kept ahead of it and counted in
        `count`."""
        sinks = min(self.sinks, count, psi.shape[1])
        if sinks == 0:
            return self.choose(psi, modality_tags, count, present)
        if present is None or bool(present[:, :sinks].all()):
            rest = self.choose(psi[:, sinks:], modality_tags[sinks:], count - sinks,
                               None if present is None else present[:, sinks:])
            return torch.cat([torch.ones(psi.shape[0], sinks, dtype=torch.bool, device=psi.device), rest], dim=1)
        # an earlier compaction kept fewer tokens than the sinks (a budget of a few tokens): the
        # sinks are the first tokens each head still holds, never ones it no longer has
        first = present & (present.cumsum(dim=1) <= sinks)
        return first | self.choose(psi.masked_fill(first, 0.0), modality_tags, count - sinks, present & ~first)


def bucket_budgets(budgets: list[int], buckets: int, cap: int) -> list[int]:
    """Per-layer budgets made equal inside `buckets` contiguous equal runs of layers: each run
    keeps its layers' mean (largest remainder), so the total stays at most the original one."""
    size = len(budgets) // buckets
    if size * buckets != len(budgets):
        raise ValueError(f"{len(budgets)} layers cannot be split into {buckets} equal buckets")
    means = [sum(budgets[b * size:(b + 1) * size]) / size for b in range(buckets)]
    total = sum(budgets) // size
    if total >= buckets and cap >= 1:  # every bucket keeps a token: vLLM refuses a group with none
        per_bucket = [1 + count for count in distribute([m - 1 for m in means], total - buckets, cap - 1)]
    else:
        per_bucket = distribute(means, total, cap)
    return [count for count in per_bucket for _ in range(size)]
