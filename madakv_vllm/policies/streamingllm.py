"""StreamingLLM (Xiao et al., ICLR 2024): attention sinks plus the most recent tokens.

No scores: each head keeps the first `sinks` tokens and the latest ones up to the budget.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import EvictionPolicy


@dataclass
class StreamingLLM(EvictionPolicy):
    sinks: int = 4
    name: ClassVar[str] = "streamingllm"
    needs_scores: ClassVar[bool] = False

    def protected_tail(self, n: int, kept: int) -> int:
        return kept - min(self.sinks, kept)  # recent tokens; the rest of the budget are sinks

    def choose(self, layer: int, psi: torch.Tensor, modality_tags: torch.Tensor, count: int) -> torch.Tensor:
        keep = torch.zeros(psi.shape, dtype=torch.bool, device=psi.device)
        keep[:, :count] = True
        return keep
