"""MadaKV (Li et al., ACL 2025, arXiv 2506.15724): modality-adaptive eviction.

Scores are SnapKV-style proxy-window attention. Two parts, each switchable (the paper's ablation):
- MPA (modality preference adaptation): each head splits its budget between visual (image +
  video) and text tokens in proportion to the attention mass it gives each, then keeps its top
  tokens inside each modality.
- HCC (hierarchical compression compensation): layer l keeps its demand, the mean over heads
  of the fewest visual plus text tokens covering a fraction `theta` of each modality's mass
  (clamped); what it spends above its running share phi is taken back evenly from the layers
  after it, so the total is conserved and the last layer takes the remainder:
      phi[l+1] = phi[l] - (b[l] - phi[l]) / (L - 1 - l)
  (the paper's K^l / (L - l) with K^l summed over heads, in per-head units; see
  ../shared/reference/MADAKV_SPEC.md section 1.7 for the choices the paper leaves open).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from madakv_kernels import TEXT, coverage_demand, modality_mass, split_quota, topk_mask

from .base import EvictionPolicy


@dataclass
class MadaKV(EvictionPolicy):
    """`theta`: coverage threshold of the HCC demand. `min_layer_ratio`: floor of a layer's
    selectable budget as a ratio of the prompt (at least one token). `mpa`, `hcc`: switch the
    two parts on or off."""

    theta: float = 0.9
    mpa: bool = True
    hcc: bool = True
    min_layer_ratio: float = 0.01
    name: ClassVar[str] = "madakv"

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.theta <= 1.0:
            raise ValueError(f"{self.name}: theta must be in (0, 1], got {self.theta}")
        if not 0.0 <= self.min_layer_ratio < 1.0:
            raise ValueError(f"{self.name}: min_layer_ratio must be in [0, 1), got {self.min_layer_ratio}")

    def layer_demand(self, psi: torch.Tensor, modality_tags: torch.Tensor) -> float:
        """Mean over heads of k_v + k_t (tokens covering theta of each modality's mass)."""
        text = modality_tags == TEXT
        demand = coverage_demand(psi, ~text, self.theta) + coverage_demand(psi, text, self.theta)
        return float(demand.float().mean())

    def layer_budgets(self, scores: torch.Tensor, modality_tags: torch.Tensor, per_layer: int) -> list[int]:
        num_layers, _, n_select = scores.shape
        if not self.hcc:
            return [per_layer] * num_layers
        floor = min(per_layer, max(1, int(self.min_layer_ratio * n_select + 0.5)))
        phi = float(per_layer)  # running per-head share of the layers not yet budgeted
        budgets: list[int] = []
        for layer in range(num_layers):
            remaining = num_layers - 1 - layer
            if remaining == 0:  # the last layer takes what is left
                budgets.append(min(n_select, max(0, per_layer * num_layers - sum(budgets))))
                break
            # highest spend that still leaves every later layer at least the floor
            ceiling = min(n_select, int(phi + remaining * (phi - floor)))
            demand = self.layer_demand(scores[layer], modality_tags)
            spend = max(floor, min(ceiling, int(demand + 0.5)))
            budgets.append(spend)
            phi -= (spend - phi) / remaining
        return budgets

    def choose(self, layer: int, psi: torch.Tensor, modality_tags: torch.Tensor, count: int) -> torch.Tensor:
        if not self.mpa:
            return super().choose(layer, psi, modality_tags, count)
        text = modality_tags == TEXT
        mass = modality_mass(psi, modality_tags, psi.shape[1])  # [H, 3]
        w_text, w_visual = mass[:, TEXT], mass[:, 1:].sum(dim=1)
        total = w_text + w_visual
        n_visual = int((~text).sum())
        # A head with no mass at all (e.g. nothing selectable) splits by token counts.
        count_share = torch.full_like(total, n_visual / max(1, psi.shape[1]))
        visual_share = torch.where(total > 0, w_visual / total.clamp(min=1e-30), count_share)
        visual, text_count = split_quota(count, visual_share, n_visual, psi.shape[1] - n_visual)
        return topk_mask(psi, ~text, visual) | topk_mask(psi, text, text_count)
