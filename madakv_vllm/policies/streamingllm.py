"""StreamingLLM (Xiao et al., ICLR 2024): attention sinks plus the most recent tokens.

No scores: each head keeps the first `sinks` tokens and the latest ones up to the budget
(the recent part never shrinks below the window, so tiny budgets lose sinks first).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from madakv_kernels import topk_mask

from .base import EvictionPolicy


@dataclass
class StreamingLLM(EvictionPolicy):
    sinks: int = 4  # the base policy keeps them first; choose() then takes the next tokens
    name: ClassVar[str] = "streamingllm"
    needs_scores: ClassVar[bool] = False

    def protected_tail(self, kept: int) -> int:
        # recent tokens (never fewer than the window); the rest of the budget are sinks
        return max(kept - self.sinks, min(self.window, kept))

    def choose(self, psi: torch.Tensor, modality_tags: torch.Tensor, count: int,
               present: torch.Tensor | None = None) -> torch.Tensor:
        if present is None:
            keep = torch.zeros(psi.shape, dtype=torch.bool, device=psi.device)
            keep[:, :count] = True
            return keep
        # the earliest tokens each head still holds
        earliest = -torch.arange(psi.shape[1], device=psi.device, dtype=torch.float32).expand_as(psi)
        return topk_mask(earliest, present, torch.full((psi.shape[0],), count, device=psi.device))
