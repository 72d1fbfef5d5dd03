"""The one message from the scheduler (engine core) to the workers, and where it travels.

The scheduler attaches a {request id: CompactionPlan} dict to each SchedulerOutput under
PLANS_ATTR; vLLM pickles the whole object to the workers, attribute included. Everything else
both sides need (policy, target) they compute from the request itself (requests.py).
"""
from __future__ import annotations

from dataclasses import dataclass

PLANS_ATTR = "kv_eviction_plans"


@dataclass
class CompactionPlan:
    """Sent one step after the prompt's last chunk: move the kept prompt tokens (per head) and
    every token computed after the prompt into `block_ids`, in order."""

    block_ids: list[int]
    prompt_len: int
    kept: int
    computed: int  # tokens [prompt_len, computed) are copied after the kept ones


def attach_plans(scheduler_output, plans: dict[str, CompactionPlan]) -> None:
    setattr(scheduler_output, PLANS_ATTR, plans)


def plans_of(scheduler_output) -> dict[str, CompactionPlan]:
    return getattr(scheduler_output, PLANS_ATTR, None) or {}
