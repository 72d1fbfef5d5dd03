"""H2O heavy hitters (Zhang et al., NeurIPS 2023), applied once at prefill.

Tokens are ranked by accumulated attention from every prompt query (not just a window); each
head keeps its heavy hitters plus the most recent tokens, half of the budget each, as in the
LOOK-M MileBench harness (10 % + 10 % at a 20 % budget).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import EvictionPolicy


@dataclass
class H2O(EvictionPolicy):
    """`recent_fraction`: share of the budget given to the most recent tokens (at least `window`).
    `max_queries`: attention is accumulated over the last `max_queries` prompt queries (0 = all of
    them). Scoring with every query costs as much as prefill attention again (quadratic): with
    the default 4096 an 8K prompt costs half of that, and prompts up to 4K are scored in full."""

    recent_fraction: float = 0.5
    max_queries: int = 4096
    name: ClassVar[str] = "h2o"

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.recent_fraction < 1.0:
            raise ValueError(f"{self.name}: recent_fraction must be in [0, 1), got {self.recent_fraction}")
        if isinstance(self.max_queries, bool) or not isinstance(self.max_queries, int) or self.max_queries < 0:
            raise ValueError(f"{self.name}: max_queries must be an integer >= 0, got {self.max_queries!r}")
        if self.during_prefill:  # its scores add up over every prompt query, across chunks
            raise ValueError(f"{self.name} scores with every prompt query: it cannot evict during prefill "
                             "(use a window policy: madakv, snapkv, pyramidkv, streamingllm)")

    def score_queries(self, n: int) -> int:
        # accumulated attention of the prompt's queries (the last max_queries of them)
        return n if self.max_queries == 0 else min(n, max(self.max_queries, self.window, 1))

    def protected_tail(self, kept: int) -> int:
        return min(kept, max(self.window, int(kept * self.recent_fraction)))
