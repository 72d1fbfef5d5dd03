"""Turning per-head token scores into keep indices (torch: sorts over N are already fast).

Modality tags per token: 0 text, 1 image, 2 video. MPA treats image and video as one "visual"
modality. All functions work on the selectable prefix psi[:, :n_select]; the proxy window
[n_select, N) is kept by the caller.
"""
from __future__ import annotations

import torch

TEXT, IMAGE, VIDEO = 0, 1, 2
MODALITY_TAGS = {"text": TEXT, "image": IMAGE, "video": VIDEO}  # vLLM's modality names -> tags
NUM_MODALITIES = len(MODALITY_TAGS)


def modality_mass(psi: torch.Tensor, modality_tags: torch.Tensor, n_select: int) -> torch.Tensor:
    """Attention mass each KV head gives each modality over tokens [0, n_select): [H, 3]."""
    mass = torch.zeros(psi.shape[0], NUM_MODALITIES, dtype=torch.float32, device=psi.device)
    tags = modality_tags[:n_select].long().expand(psi.shape[0], -1)
    return mass.scatter_add_(1, tags, psi[:, :n_select].float())


def coverage_demand(psi: torch.Tensor, member: torch.Tensor, theta: float) -> torch.Tensor:
    """Per head, the fewest member tokens whose scores cover a fraction theta of the members' mass.

    psi: [H, n]; member: bool [n]. Heads with zero member mass demand 0 tokens.
    """
    scores = psi.float().masked_fill(~member, 0.0)
    ranked, _ = scores.sort(dim=1, descending=True)
    cum = ranked.cumsum(dim=1)
    total = cum[:, -1:] if cum.shape[1] else torch.zeros(psi.shape[0], 1, device=psi.device)
    # tokens needed = 1 + number of prefix sums still below the target (ties at the target stop)
    demand = (cum < theta * total).sum(dim=1) + 1
    # the cap stays a device tensor: no host sync (callers read all layers' demands at once)
    return torch.where(total[:, 0] > 0, torch.minimum(demand, member.sum()), torch.zeros_like(demand))


def topk_mask(scores: torch.Tensor, member: torch.Tensor, counts: torch.Tensor | int) -> torch.Tensor:
    """Bool [H, n]: per head h, the counts[h] highest-scoring member tokens (ties: lower position).
    `member`: bool [n], or [H, n] when heads may choose among different tokens."""
    order = rank_order(scores)
    return in_positions(firsts(listed(member, order), counts), order)


def rank_order(scores: torch.Tensor) -> torch.Tensor:
    """[H, n]: each head's token positions, highest score first (ties: lower position first)."""
    ranked_scores = scores if scores.dtype == torch.float64 else scores.float()
    return ranked_scores.sort(dim=1, descending=True, stable=True).indices


def listed(mask: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """A bool mask over positions ([n] or [H, n]) rewritten in each head's rank order [H, n]."""
    return mask.expand_as(order).gather(1, order)


def firsts(in_order: torch.Tensor, counts: torch.Tensor | int) -> torch.Tensor:
    """Of a mask in rank order [H, n], the first counts[h] marked per head: a top-k without a sort,
    so several picks from one candidate set share one rank_order."""
    counts = torch.as_tensor(counts, device=in_order.device).reshape(-1, 1)
    return in_order & (in_order.long().cumsum(dim=1) <= counts)


def in_positions(in_order: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """A mask in rank order [H, n] back over token positions."""
    return torch.zeros_like(in_order).scatter_(1, order, in_order)


def span_ranks(psi: torch.Tensor, modality_tags: torch.Tensor, span: int) -> torch.Tensor:
    """Ranking scores [H, n] (float64) under which tokens come in whole spans: each run of
    same-modality tokens is cut into spans of `span` tokens from its start, spans rank by their
    summed score and tokens inside a span by their own (so a top-k cut splits at most one span).
    Keeps multi-token facts together (ChunkKV's observation); higher ranks first."""
    heads, n = psi.shape
    if span == 1 or n == 0:
        return psi
    pos = torch.arange(n, device=psi.device)
    tags = modality_tags[:n]
    run_starts = torch.ones(n, dtype=torch.bool, device=psi.device)
    run_starts[1:] = tags[1:] != tags[:-1]
    run_start = torch.where(run_starts, pos, 0).cummax(dim=0).values
    span_index = (run_starts | ((pos - run_start) % span == 0)).cumsum(dim=0) - 1  # 0 .. spans - 1
    spans = int(span_index[-1]) + 1
    sums = torch.zeros(heads, spans, dtype=torch.float64, device=psi.device)
    sums.scatter_add_(1, span_index.expand(heads, -1), psi.double())
    order = sums.argsort(dim=1, descending=True, stable=True)  # equal sums: the earlier span first
    span_rank = torch.empty_like(order)
    span_rank.scatter_(1, order, torch.arange(spans, device=psi.device).expand(heads, -1))
    # integer part: the span's place; fraction in [0, 0.5]: the token's own score inside it
    own = psi.double() / (2 * psi.double().amax(dim=1, keepdim=True)).clamp(min=1e-300)
    return (spans - span_rank.gather(1, span_index.expand(heads, -1))).double() + own


def split_quota(total: int, visual_share: torch.Tensor, n_visual: int | torch.Tensor,
                n_text: int | torch.Tensor, unit: int = 1, nearest: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head (visual, text) counts summing to `total`, visual ~ round(total * share).
    `n_visual`, `n_text`: tokens of each modality there are, one count or one per head [H].
    `unit` > 1: the smaller quota is rounded up to whole units, the larger takes the rest
    (selection keeps whole spans, so a quota of 5 slots with spans of 8 keeps no span whole),
    unless that would make it the larger one (fewer than two units in all): then it stays as is.
    `nearest`: rounded to the nearest whole unit instead (a quota under half a unit keeps nothing).

    A modality with fewer tokens than its share gives the surplus to the other one.
    """
    exact = total * visual_share
    if unit > 1:
        smaller = torch.minimum(exact, total - exact)
        rounded = (torch.floor(smaller / unit + 0.5) if nearest else torch.ceil(smaller / unit - 1e-6)) * unit
        rounded = torch.where(rounded <= total - rounded, rounded, smaller)
        exact = torch.where(exact <= total - exact, rounded, total - rounded)
    visual = torch.round(exact).long().clamp(0, total)
    n_visual, n_text = (torch.as_tensor(c, device=visual.device) for c in (n_visual, n_text))
    visual = torch.minimum(torch.maximum(visual, total - n_text), n_visual)
    return visual, total - visual


def keep_indices(keep: torch.Tensor, n_total: int, n_select: int) -> torch.Tensor:
    """Sorted keep indices [H, K] from a selection mask over [0, n_select) plus the window [n_select, n_total)."""
    heads = keep.shape[0]
    window = torch.ones(heads, n_total - n_select, dtype=torch.bool, device=keep.device)
    full = torch.cat([keep, window], dim=1)
    counts = full.sum(dim=1)
    if not bool((counts == counts[0]).all()):
        raise AssertionError(f"heads keep unequal counts {counts.tolist()}")
    return full.nonzero()[:, 1].view(heads, -1)


def held_mask(positions: list[torch.Tensor] | None, n: int) -> torch.Tensor | None:
    """Bool [L, H, n]: per layer and head, the logical positions a compacted cache holds
    (`positions[l]`: [H, held_l], layers may hold different counts); None when nothing was
    compacted (every token held)."""
    if positions is None:
        return None
    present = torch.zeros(len(positions), positions[0].shape[0], n, dtype=torch.bool, device=positions[0].device)
    for layer, held in zip(present, positions):
        layer.scatter_(1, held.to(layer.device), True)
    return present


def logical_positions(survivors: torch.Tensor, covered: int, held: int) -> torch.Tensor:
    """[H, held]: the logical position of each physical slot of a compacted layer whose heads kept
    `survivors` [H, S] (logical, sorted) of the first `covered` tokens; the tokens computed since
    follow them in order."""
    later = torch.arange(covered, covered + held - survivors.shape[1], device=survivors.device)
    return torch.cat([survivors, later.expand(survivors.shape[0], -1)], dim=1)


def physical_indices(keep: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Where kept tokens sit in a compacted cache: `keep` [H, K] are logical positions, `present`
    [H, n] bool marks the positions each head still holds, in order (a cache compacted before
    holds its survivors densely). Returns the physical slots [H, K]."""
    slot = present.long().cumsum(dim=1) - 1
    return slot.gather(1, keep.long())
