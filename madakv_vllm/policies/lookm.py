"""LOOK-M text-prior eviction (Wan et al., 2024, arXiv 2406.18139), without merging.

H2O's accumulated attention and recent window, but every text token outranks every image or
video token, so images are evicted first. LOOK-M also merges each evicted KV into its most
similar kept one; that changes cached values and is not implemented here (eviction only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from madakv_kernels import TEXT

from .h2o import H2O


@dataclass
class LookM(H2O):
    name: ClassVar[str] = "lookm"

    def rank_scores(self, psi: torch.Tensor, modality_tags: torch.Tensor) -> torch.Tensor:
        text_bonus = psi.amax().clamp(min=0) + 1.0
        return psi + (modality_tags == TEXT).to(psi.dtype) * text_bonus
