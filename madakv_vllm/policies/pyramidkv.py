"""PyramidKV (Cai et al., COLM 2025): SnapKV ranking with pyramid-shaped layer budgets.

Budgets fall linearly from the first layer to the last ("pyramidal information funneling"):
the last layer gets base / beta, the first 2 * base - base / beta, so the mean stays the base.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import distribute
from .snapkv import SnapKV


@dataclass
class PyramidKV(SnapKV):
    """`beta`: ratio between the mean budget and the last layer's budget."""

    beta: float = 20.0
    name: ClassVar[str] = "pyramidkv"

    def __post_init__(self):
        super().__post_init__()
        if self.beta < 1:
            raise ValueError(f"{self.name}: beta must be >= 1, got {self.beta}")

    def varies_by_layer(self) -> bool:
        return True

    def budgets_from_demands(self, demands, per_layer: int, num_layers: int, n_select: int) -> list[int]:
        if num_layers == 1:
            return [per_layer]
        # at least one token in the last layer (beside the protected tail, which may be empty), or
        # rounding can leave it none: a KV-cache group with no prompt token cannot be served
        low = max(per_layer / self.beta, min(1, per_layer))
        high = 2 * per_layer - low
        targets = [high - (high - low) * layer / (num_layers - 1) for layer in range(num_layers)]
        return distribute(targets, per_layer * num_layers, n_select)
