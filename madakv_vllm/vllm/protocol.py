"""The messages between the scheduler (engine core) and the workers, and where they travel.

Scheduler -> workers: a {request id: CompactionPlan} dict on each SchedulerOutput under
PLANS_ATTR; vLLM pickles the whole object to the workers, attribute included. Likewise
{request id: point} under PROBES_ATTR: the request's last `probe` scheduled rows in that step
are its question's window, run right after its chunk ending at `point` (`prefill_scores: appended`).
Workers -> scheduler (several KV-cache groups and layer budgets that depend on the scores only):
{request id: kept tokens per group} on the ModelRunnerOutput of the step that finished scoring
the prompt, under REPORT_ATTR (pickled back the same way). Everything else both sides need
(policy, target) they compute from the request itself (requests.py).
"""
from __future__ import annotations

from dataclasses import dataclass

PLANS_ATTR = "kv_eviction_plans"
PROBES_ATTR = "kv_eviction_probes"
REPORT_ATTR = "kv_eviction_kept_per_group"


@dataclass
class CompactionPlan:
    """Sent once the prompt is computed and every KV-cache group's kept count is known: in group
    g, move the kept prompt tokens (per head, `kept[g]` of them) and every token computed after
    the prompt into `block_ids[g]`, in order. With eviction during prefill, also between prefill
    chunks: then `covered` (the tokens selected from) is the computed part of the prompt."""

    block_ids: list[list[int]]
    covered: int  # the prompt length, or the end of the chunk a compaction between chunks follows
    kept: list[int]
    computed: int  # tokens [covered, computed) are copied after the kept ones


def attach_plans(scheduler_output, plans: dict[str, CompactionPlan]) -> None:
    setattr(scheduler_output, PLANS_ATTR, plans)


def plans_of(scheduler_output) -> dict[str, CompactionPlan]:
    return getattr(scheduler_output, PLANS_ATTR, None) or {}


def attach_probes(scheduler_output, probes: dict[str, int]) -> None:
    setattr(scheduler_output, PROBES_ATTR, probes)


def probes_of(scheduler_output) -> dict[str, int]:
    return getattr(scheduler_output, PROBES_ATTR, None) or {}


def attach_report(model_runner_output, kept: dict[str, list[int]]) -> bool:
    """Put the workers' per-group kept counts on a step's output; False when this output cannot
    carry them (vLLM's shared empty output), so the caller keeps them for the next one."""
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

    output = getattr(model_runner_output, "_model_runner_output", model_runner_output)  # async output
    if not isinstance(output, ModelRunnerOutput) or output is EMPTY_MODEL_RUNNER_OUTPUT:
        return False
    setattr(output, REPORT_ATTR, {**getattr(output, REPORT_ATTR, {}), **kept})
    return True


def report_of(model_runner_output) -> dict[str, list[int]]:
    return getattr(model_runner_output, REPORT_ATTR, None) or {}
