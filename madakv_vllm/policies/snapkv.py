"""SnapKV (Li et al., NeurIPS 2024, arXiv 2404.14469).

Tokens are ranked by the attention they get from the observation window (the last `window`
prompt tokens), smoothed by 1-D max pooling so that neighbours of a hit survive with it; each
head keeps its top tokens plus the window, with the same budget in every layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import EvictionPolicy, max_pool_scores


@dataclass
class SnapKV(EvictionPolicy):
    """`kernel_size`: max-pool width over neighbouring tokens (odd; 1 disables pooling)."""

    kernel_size: int = 7
    name: ClassVar[str] = "snapkv"

    def __post_init__(self):
        super().__post_init__()
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"{self.name}: kernel_size must be odd and >= 1, got {self.kernel_size}")

    def rank_scores(self, psi: torch.Tensor, modality_tags: torch.Tensor) -> torch.Tensor:
        return max_pool_scores(psi, self.kernel_size)
