"""Which policy applies to a request, computed the same way on the scheduler and the workers
(no messages between them): the engine's eviction config, overridden per request by the
OpenAI body's `vllm_xargs` (`{"kv_eviction": "none"}`, `{"kv_eviction_budget": 0.1}`)."""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import EvictionConfig, EvictionConfigError
from ..policies import EvictionPolicy
from ..policies.base import decode_point, probe_fits

logger = logging.getLogger("madakv_vllm")

CONFIG_KEY = "kv_eviction"  # in VllmConfig.additional_config
LAYER_GROUPS_KEY = "kv_eviction_layer_groups"  # in VllmConfig.additional_config: KV-cache groups (buckets)
MAX_SCORE_BYTES_KEY = "kv_eviction_max_score_bytes"  # in VllmConfig.additional_config: see max_score_bytes
XARG_POLICY = "kv_eviction"  # in SamplingParams.extra_args (vllm_xargs)
XARG_BUDGET = "kv_eviction_budget"
XARG_WINDOW = "kv_eviction_window"
XARG_DURING_PREFILL = "kv_eviction_during_prefill"
XARG_DECODE_BUDGET = "kv_eviction_decode_budget"
XARG_PREFILL_SCORES = "kv_eviction_prefill_scores"
_XARGS = {XARG_POLICY: "policy", XARG_BUDGET: "budget", XARG_WINDOW: "window", XARG_DURING_PREFILL: "during_prefill",
          XARG_DECODE_BUDGET: "decode_budget", XARG_PREFILL_SCORES: "prefill_scores"}


def engine_config(additional_config: Mapping[str, Any] | None) -> EvictionConfig | None:
    """The engine-wide eviction config, or None when eviction is off."""
    data = (additional_config or {}).get(CONFIG_KEY)
    if not data:
        return None
    config = check_served(EvictionConfig.from_mapping(data, source=f"additional_config[{CONFIG_KEY!r}]"))
    return None if config.policy == "none" else config


SERVED_PREFILL_SCORES = ("chunk", "appended")


def check_served(config: EvictionConfig) -> EvictionConfig:
    """What the HF reference path runs but vLLM does not (yet): raises EvictionConfigError."""
    policy = config.build_policy()
    if policy is not None and policy.during_prefill and policy.prefill_scores not in SERVED_PREFILL_SCORES:
        raise EvictionConfigError(f"prefill_scores {policy.prefill_scores!r} runs on the HF reference path only; "
                                  f"vLLM serves {' and '.join(SERVED_PREFILL_SCORES)}")
    return config


def _switch(value: Any) -> Any:
    """An on/off override as JSON bodies send it: vLLM's `vllm_xargs` keeps only strings and
    numbers, so `true` arrives as 1 (and some clients send "true"); anything else stays as it is
    and is refused by the policy."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return value


def request_config(base: EvictionConfig, extra_args: Mapping[str, Any] | None) -> EvictionConfig:
    """The base config with this request's overrides; raises EvictionConfigError on bad ones."""
    overrides = {field: extra_args[key] for key, field in _XARGS.items() if extra_args and key in extra_args}
    if "during_prefill" in overrides:
        overrides["during_prefill"] = _switch(overrides["during_prefill"])
    if not overrides:
        return base
    try:
        return check_served(base.merged(**overrides))
    except EvictionConfigError as exc:
        raise EvictionConfigError(f"bad vllm_xargs for KV eviction: {exc}") from None


def layer_groups(additional_config: Mapping[str, Any] | None) -> int:
    """How many KV-cache groups (contiguous equal buckets of layers) the engine runs with: 1 keeps
    every layer at the same count (regime A); more let layer budgets differ per bucket (regime B)."""
    return int((additional_config or {}).get(LAYER_GROUPS_KEY) or 1)


def request_policy(base: EvictionConfig, extra_args: Mapping[str, Any] | None,
                   groups: int = 1) -> EvictionPolicy | None:
    """The policy for one request. With one KV-cache group all layers keep the same count (they
    share one block table); with several, each bucket of layers keeps its own."""
    try:
        config = request_config(base, extra_args)
    except EvictionConfigError:
        config = base  # validated at the API server; never fail a step over it
    policy = config.build_policy()
    if policy is not None:
        policy.layer_buckets = groups
    return policy


@dataclass(frozen=True)
class EvictionTarget:
    """What eviction will do to a request's prompt: keep `kept` of `prompt_len` tokens per
    head and layer on average, scored by the attention of the last `score_queries` prompt
    tokens. `reported_counts`: the KV-cache groups keep different counts that only the workers
    can compute (from the scores, after the prompt); they report them to the scheduler.
    `limit` (eviction during prefill): at every multiple of `chunk` prompt tokens, a request
    holding more than this many tokens per head is compacted back to `kept` (None: only after
    the prompt). Fixed points, and chunks never cross them (the scheduler cuts them there), so
    what is kept does not depend on how the prompt's chunks shared steps with other requests.
    `decode_cap` (eviction during decode): compactions after the prompt bring every group back to
    this many tokens (`decode_points`); `kept` is then the prompt length when the budget covers
    the prompt (only the output is evicted)."""

    prompt_len: int
    kept: int
    score_queries: int
    reported_counts: bool = False
    limit: int | None = None
    chunk: int = 0
    decode_cap: int | None = None
    decode_slack: int = 0
    decode_interval: int = 0
    decode_queries: int = 0
    probe: int = 0  # prefill_scores "appended": the question's window runs after the chunk a compaction follows

    def probes_at(self, point: int, mm_features) -> bool:
        """Whether the compaction after the chunk ending at `point` is scored by the question's
        window run right after that chunk (`probe_fits`); else by the chunk's own last queries."""
        return probe_fits(point, self.prompt_len, self.probe,
                          lambda start, end: has_embeds_between(mm_features, start, end))

    @property
    def prompt_evicted(self) -> bool:
        return self.kept < self.prompt_len

    def first_decode_point(self, max_kept: int, since: int) -> int | None:
        """The first compaction point during decode, once the prompt's compaction kept at most
        `max_kept` tokens in a group and was made at logical length `since` (both the prompt
        length when the prompt is not evicted). Then every `decode_interval` tokens."""
        if self.decode_cap is None:
            return None
        return decode_point(self.decode_cap, self.decode_slack, self.decode_queries, self.prompt_len - max_kept, since)

    def decode_point_after(self, first: int, position: int) -> int:
        """The first compaction point during decode after logical `position`."""
        if position < first:
            return first
        return first + ((position - first) // self.decode_interval + 1) * self.decode_interval

    def decode_point_due(self, first: int, computed: int, covered: int) -> int | None:
        """The point a compaction during decode follows now, if any: the last point reached, not
        compacted yet, whose window's scores are still whole (the next point's window has not
        started: its queries would have replaced them)."""
        if computed < first:
            return None
        point = first + (computed - first) // self.decode_interval * self.decode_interval
        if point <= covered or computed > point + self.decode_interval - self.decode_queries:
            return None
        return point

    def compacts_after_chunk(self, computed: int, held: int) -> bool:
        """Whether a prefill chunk ending at `computed`, after which a head holds `held` tokens,
        is followed by a compaction (scheduler and workers decide alike)."""
        # never inside the proxy window: its scores must all be for the prompt's own compaction
        return (self.limit is not None and held > self.limit and computed % self.chunk == 0
                and computed < self.prompt_len and computed <= self.prompt_len - self.score_queries)

    def prefill_peak_blocks(self, block_size: int) -> int:
        """With eviction during prefill: the most blocks of one KV-cache group the prompt holds at
        once, alone, when every compaction runs in time: up to limit + one chunk after a chunk,
        while a compaction copies the kept tokens into fresh blocks and the next chunk (or the
        first output token) is allocated (copy-on-compact). A pool that holds the whole request
        needs no more: a compaction that finds no room waits while the request goes on."""
        blocks = lambda tokens: -(-tokens // block_size)  # noqa: E731
        if self.limit is None:
            return blocks(self.prompt_len)
        # a probe's scratch slots follow the chunk it rides on
        held = min(self.prompt_len, self.limit + self.chunk + self.probe)
        copy = min(self.prompt_len, self.kept + self.chunk)
        return blocks(held) + blocks(copy)

    def decode_peak_blocks(self, block_size: int) -> int:
        """With eviction during decode: the most blocks of one KV-cache group the request holds
        while its output grows, when every compaction runs in time: the prompt's survivors and
        the first window, or the cap + one interval, while the kept tokens are copied into fresh
        blocks (with the few tokens an asynchronous step may carry over)."""
        blocks = lambda tokens: -(-tokens // block_size)  # noqa: E731
        carried = 2
        held = max(self.decode_cap + self.decode_interval, self.kept + self.decode_queries) + carried
        return blocks(held) + blocks(self.decode_cap + carried + 1)

    def first_scored_query(self) -> int:
        """Prefix-cache hits must stop here: the first queries that score a compaction (the first
        compaction between chunks, or the prompt's own) are computed, so a request that hits
        compacts exactly where it would have without the hit."""
        if not self.prompt_evicted:  # only the output is evicted: its first scored query follows the prompt
            return self.prompt_len
        first = self.prompt_len - self.score_queries
        if self.limit is not None:
            point = (self.limit // self.chunk + 1) * self.chunk  # nothing compacted yet: held = point
            if point <= first and point < self.prompt_len:
                first = point - self.score_queries
        return first

    def next_compaction_point(self, computed: int) -> int | None:
        """The first point after `computed` where a compaction between chunks may follow."""
        if self.limit is None:
            return None
        point = (computed // self.chunk + 1) * self.chunk
        return point if point <= self.prompt_len - self.score_queries and point < self.prompt_len else None

    @property
    def evicted(self) -> int:
        return self.prompt_len - self.kept


# Scores live outside vLLM's memory budget until the plan: fp32 [layers, kv_heads, prompt] per
# request being prefilled (128K tokens x 32 layers x 8 KV heads = 134 MB). Above this a request
# runs without eviction (a warning says so); env MADAKV_MAX_SCORE_BYTES changes it.
MAX_SCORE_BYTES = 1 << 30
MAX_SCORE_BYTES_ENV = "MADAKV_MAX_SCORE_BYTES"


def max_score_bytes_from_env() -> int:
    """Read once, where the engine config is made: the scheduler and the workers (other processes,
    other nodes) must not each read their own environment, or they could disagree on which
    requests are evicted. Raises EvictionConfigError on a bad value."""
    raw = os.environ.get(MAX_SCORE_BYTES_ENV)
    if raw is None:
        return MAX_SCORE_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise EvictionConfigError(f"{MAX_SCORE_BYTES_ENV} must be a byte count >= 0, got {raw!r}")
    return value


def max_score_bytes(additional_config: Mapping[str, Any] | None) -> int:
    """The limit the engine config carries (the same in every process)."""
    value = (additional_config or {}).get(MAX_SCORE_BYTES_KEY)
    return MAX_SCORE_BYTES if value is None else int(value)


def has_embeds_between(mm_features, start: int, end: int) -> bool:
    """Whether any of a request's images or videos puts embeddings among positions [start, end)
    (vLLM merges them there, by position, into whatever rows the step computes)."""
    for feature in mm_features or ():
        pos = feature.mm_position
        lo, hi = max(start, pos.offset), min(end, pos.offset + pos.length)
        if lo < hi and (pos.is_embed is None or bool(pos.is_embed[lo - pos.offset : hi - pos.offset].any())):
            return True
    return False


def prefill_chunk_tokens(vllm_config) -> int:
    """The most prompt tokens a request computes in one step (chunked prefill's chunk): where
    compactions between chunks may happen (EvictionTarget.chunk)."""
    scheduler_config = vllm_config.scheduler_config
    if not scheduler_config.enable_chunked_prefill:
        return vllm_config.model_config.max_model_len
    chunk = scheduler_config.max_num_batched_tokens
    threshold = getattr(scheduler_config, "long_prefill_token_threshold", 0) or 0
    return min(chunk, threshold) if threshold > 0 else chunk


def eviction_target(policy: EvictionPolicy | None, prompt_len: int, scores_per_token: int = 0,
                    groups: int = 1, score_bytes_limit: int = MAX_SCORE_BYTES, chunk: int = 0) -> EvictionTarget | None:
    """None when nothing will be evicted (no policy, the budget covers the prompt, or its scores,
    `scores_per_token` fp32 values per prompt token, would exceed `score_bytes_limit`)."""
    if policy is None:
        return None
    if policy.needs_scores and 4 * scores_per_token * prompt_len > score_bytes_limit:
        logger.warning("KV eviction skipped for a %d-token prompt: its scores would take %.0f MiB (limit "
                       "%s = %d)", prompt_len, 4 * scores_per_token * prompt_len / 2**20, MAX_SCORE_BYTES_ENV,
                       score_bytes_limit)
        return None
    kept = policy.kept_tokens(prompt_len)
    cap = policy.decode_cap(prompt_len)
    if kept >= prompt_len and cap is None:
        return None
    kept = min(kept, prompt_len)
    score_queries = policy.score_queries(prompt_len) if policy.needs_scores else 0
    # The scheduler and workers compute from this: an impossible target must never reach a
    # worker. Policies guarantee it; if one ever does not, the request runs without eviction.
    if not 1 <= kept <= prompt_len or (policy.needs_scores and not 1 <= score_queries <= prompt_len):
        logger.warning("KV eviction skipped for a %d-token prompt: %s keeps %d tokens scored by %d queries",
                       prompt_len, policy.name, kept, score_queries)
        return None
    evicted = kept < prompt_len
    during = policy.during_prefill and chunk > 0 and evicted
    limit = kept + policy.slack_tokens(kept) if during else None
    probe = policy.question_probe(prompt_len) if during else 0
    if during:
        chunk = policy.compaction_interval(chunk, prompt_len)
        if chunk < 1:  # the API server refuses such requests (plugin.probe_error)
            logger.warning("KV eviction skipped for a %d-token prompt: its %d-token probe leaves no room in the "
                           "prefill chunk", prompt_len, probe)
            return None
    decode = {} if cap is None else dict(decode_cap=cap, decode_slack=policy.decode_slack_tokens(cap),
                                         decode_interval=policy.decode_interval(prompt_len),
                                         decode_queries=max(policy.window, 1))
    return EvictionTarget(prompt_len, kept, score_queries,
                          reported_counts=evicted and groups > 1 and policy.varies_by_layer(), limit=limit, chunk=chunk,
                          probe=probe, **decode)


def peak_blocks(policy: EvictionPolicy | None, prompt_len: int, max_tokens: int, chunk: int, block_size: int,
                scores_per_token: int = 0, score_bytes_limit: int = MAX_SCORE_BYTES) -> int:
    """The most KV blocks one KV-cache group holds for a request alone, so that it can be served:
    its whole length without eviction during prefill or decode (a compaction that finds no room
    waits while the request goes on, as vLLM would run it). With it, whichever is more, and never
    more than the whole length: the prompt's phase (during prefill: the tokens held after a chunk,
    limit + chunk, while a compaction copies the kept ones into fresh blocks and the next chunk
    is allocated; else the whole prompt and its copy) and the output's (the kept prompt plus the
    output, or during decode `decode_peak_blocks`)."""
    blocks = lambda tokens: -(-tokens // block_size)  # noqa: E731
    whole = blocks(prompt_len + max_tokens)
    target = eviction_target(policy, prompt_len, scores_per_token, score_bytes_limit=score_bytes_limit, chunk=chunk)
    if target is None or (target.limit is None and target.decode_cap is None):
        return whole
    prompt_phase = target.prefill_peak_blocks(block_size) if target.limit is not None else \
        blocks(prompt_len + 1) + blocks(target.kept + 1)
    output_phase = blocks(target.kept + max_tokens) if target.decode_cap is None else \
        target.decode_peak_blocks(block_size)
    return min(whole, max(prompt_phase, output_phase))
