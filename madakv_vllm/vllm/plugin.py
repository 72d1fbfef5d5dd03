"""Entry point (`vllm.general_plugins`): CLI flags, config hand-over, request validation, hooks.

register() runs in every vLLM process and is idempotent. It imports only what the calling
process has already imported (vLLM's engine args), adds the CLI flags, and installs the other
hooks lazily. The version gate and what we refuse at start-up live in compat.py: on another vLLM
version or a changed signature the flags still parse, but asking for eviction fails with one line.
"""
from __future__ import annotations

import argparse
import functools
import importlib.abc
import logging
import os
import sys
import tempfile
from typing import Any

from ..config import EvictionConfig, EvictionConfigError, parse_budget, preset_names
from ..policies import POLICY_NAMES
from .compat import (
    EvictionStartupError,
    check_engine_args,
    check_vllm_config,
    require_supported,
    resolve_layer_groups,
    unsupported_reason,
)
from .metrics import ENV_DIR as METRICS_ENV_DIR
from .requests import (
    CONFIG_KEY,
    LAYER_GROUPS_KEY,
    MAX_SCORE_BYTES_KEY,
    engine_config,
    layer_groups,
    max_score_bytes,
    max_score_bytes_from_env,
    peak_blocks,
    prefill_chunk_tokens,
    request_config,
    request_policy,
)

logger = logging.getLogger("madakv_vllm")

_state: dict[str, Any] = {"registered": False, "server_config": None}


# ---- CLI --------------------------------------------------------------------------------------
def add_cli_flags(parser) -> None:
    group = parser.add_argument_group(
        "KVEvictionConfig",
        "madakv-vllm: evict KV-cache tokens after prefill and return the freed blocks to vLLM.")
    group.add_argument("--kv-eviction", choices=POLICY_NAMES, default=None,
                       help="Eviction policy; off when not given.")
    group.add_argument("--kv-eviction-budget", default=None,
                       help="Tokens kept per head and layer: a ratio of the prompt in (0, 1] or a token "
                            "count; 0.2 when not given.")
    group.add_argument("--kv-eviction-window", type=int, default=None,
                       help="Proxy window: last prompt tokens that score the others, kept and counted in "
                            "the budget; the policy's default when not given (madakv 12, the others 32).")
    group.add_argument("--kv-eviction-layer-groups", default=None, metavar="N|auto",
                       help="KV-cache groups: consecutive layers in N equal buckets, each keeping its own "
                            "token count (HCC, PyramidKV) in its own blocks; 1 = every layer keeps the same "
                            "count; auto = at most 4. 1 when not given.")
    group.add_argument("--kv-eviction-during-prefill", action="store_true", default=None,
                       help="Also evict between prefill chunks, so a request never holds more than its kept "
                            "tokens + a slack + one chunk: prompts larger than the KV pool can be served.")
    group.add_argument("--kv-eviction-decode-budget", default=None, metavar="RATIO|TOKENS",
                       help="Also evict while the output grows: a cap on the tokens each head keeps per layer "
                            "(a ratio of the prompt or a token count); once a layer holds cap + slack, every "
                            "layer is compacted back to it. Off when not given.")
    group.add_argument("--kv-eviction-config", default=None, metavar="PRESET|FILE.yaml",
                       help=f"Eviction preset by name ({', '.join(preset_names())}) or a YAML file; flags "
                            f"override it.")


def config_from_args(args: argparse.Namespace) -> EvictionConfig | None:
    """The eviction config the CLI flags describe, or None if no flag was given."""
    path = getattr(args, "kv_eviction_config", None)
    flags = dict(policy=getattr(args, "kv_eviction", None), budget=getattr(args, "kv_eviction_budget", None),
                 window=getattr(args, "kv_eviction_window", None),
                 during_prefill=getattr(args, "kv_eviction_during_prefill", None),
                 decode_budget=getattr(args, "kv_eviction_decode_budget", None))
    if path is None and all(v is None for v in flags.values()):
        return None
    base = EvictionConfig.from_yaml(path) if path else EvictionConfig(policy="madakv")
    if flags["budget"] is not None:
        flags["budget"] = parse_budget(flags["budget"])
    return base.merged(**flags)


def _fail(engine_args, exc: EvictionConfigError):
    """CLI: one line and exit 2, like argparse. Python API: the exception."""
    if getattr(engine_args, "_kv_eviction_from_cli", False):
        print(f"error: kv eviction: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    raise exc


# ---- hooks ------------------------------------------------------------------------------------
def _hook_engine_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    add_cli_args = EngineArgs.add_cli_args
    from_cli_args = EngineArgs.from_cli_args.__func__
    create_engine_config = EngineArgs.create_engine_config

    @functools.wraps(add_cli_args)
    def add_cli_args_with_eviction(parser, *args, **kwargs):
        parser = add_cli_args(parser, *args, **kwargs)
        add_cli_flags(parser)
        return parser

    @functools.wraps(from_cli_args)
    def from_cli_args_with_eviction(cls, args):
        engine_args = from_cli_args(cls, args)
        engine_args._kv_eviction_from_cli = True
        try:
            config = config_from_args(args)
        except EvictionConfigError as exc:
            _fail(engine_args, exc)
        groups = getattr(args, "kv_eviction_layer_groups", None)
        if groups is not None and config is None:
            _fail(engine_args, EvictionConfigError("--kv-eviction-layer-groups needs --kv-eviction"))
        if config is not None:
            engine_args.additional_config = {**(engine_args.additional_config or {}),
                                             CONFIG_KEY: config.as_mapping()}
            if groups is not None:
                engine_args.additional_config[LAYER_GROUPS_KEY] = groups
        return engine_args

    @functools.wraps(create_engine_config)
    def create_engine_config_with_eviction(self, *args, **kwargs):
        try:
            config = engine_config(self.additional_config)
            if config is not None:
                if (reason := unsupported_reason()) is not None:
                    raise EvictionStartupError(reason)
                check_engine_args(self)
                os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # the hooks live in the V1 runner
                # A fresh folder per engine, inherited by its processes (metrics.py); never one
                # inherited from a parent that ran its own engine, whose counters would mix in.
                os.environ[METRICS_ENV_DIR] = tempfile.mkdtemp(prefix="madakv-metrics-")
        except EvictionConfigError as exc:
            _fail(self, exc)
        vllm_config = create_engine_config(self, *args, **kwargs)
        if config is None:
            return vllm_config
        try:
            check_vllm_config(vllm_config)
            groups = resolve_layer_groups(vllm_config.additional_config.get(LAYER_GROUPS_KEY), vllm_config)
            score_bytes_limit = max_score_bytes_from_env()
        except EvictionConfigError as exc:
            _fail(self, exc)
        vllm_config.additional_config[LAYER_GROUPS_KEY] = groups
        vllm_config.additional_config[MAX_SCORE_BYTES_KEY] = score_bytes_limit
        scheduler_config = vllm_config.scheduler_config
        if scheduler_config.scheduler_cls not in (None, "vllm.v1.core.sched.scheduler.Scheduler",
                                                  "vllm.v1.core.sched.async_scheduler.AsyncScheduler"):
            _fail(self, EvictionStartupError(f"KV eviction brings its own scheduler; it cannot be combined with "
                                             f"--scheduler-cls {scheduler_config.scheduler_cls}"))
        name = "AsyncEvictingScheduler" if scheduler_config.async_scheduling else "EvictingScheduler"
        scheduler_config.scheduler_cls = f"madakv_vllm.vllm.scheduler.{name}"
        vllm_config.additional_config[CONFIG_KEY] = config.as_mapping()
        _state["server_config"] = config
        logger.info("KV eviction: %s (budget %s, window %d, %d KV-cache group(s))", config.policy, config.budget,
                    config.build_policy().window, groups)
        return vllm_config

    EngineArgs.add_cli_args = staticmethod(add_cli_args_with_eviction)
    EngineArgs.from_cli_args = classmethod(from_cli_args_with_eviction)
    EngineArgs.create_engine_config = create_engine_config_with_eviction


def xargs_error(extra_args) -> str | None:
    """Why this server cannot honour a request's eviction overrides, or None (also when off)."""
    base = _state["server_config"]
    if base is None:
        return None
    try:
        request_config(base, extra_args)
    except EvictionConfigError as exc:
        return str(exc)
    return None


def _hook_request_validation() -> None:
    """Bad per-request overrides become a VLLMValidationError (HTTP 400) in the API server."""
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    verify = SamplingParams._verify_extra_args

    @functools.wraps(verify)
    def verify_with_eviction(self):
        verify(self)
        if (error := xargs_error(self.extra_args)) is not None:
            raise VLLMValidationError(error, parameter="vllm_xargs")

    SamplingParams._verify_extra_args = verify_with_eviction


def _hook_openai_serving(module) -> None:
    """Check vllm_xargs before a chat / completion / responses request is rendered. The
    SamplingParams check above runs after rendering, when vLLM's multimodal processor cache has
    already recorded the request's images as sent to the engine: after such a 400, the next
    request with the same image failed with HTTP 500 (P0/P1 cache drift). Found by the fuzz test."""
    require_supported(module.__name__)
    serving_cls = module.GenerateBaseServing
    run_create = serving_cls._with_kv_transfer_rejection_cleanup

    @functools.wraps(run_create)
    async def validate_then_create(self, awaitable, request, raw_request, *args, **kwargs):
        if (error := xargs_error(getattr(request, "vllm_xargs", None))) is not None:
            getattr(awaitable, "close", lambda: None)()  # never started: no "never awaited" warning
            return self.create_error_response(error, param="vllm_xargs")
        return await run_create(self, awaitable, request, raw_request, *args, **kwargs)

    serving_cls._with_kv_transfer_rejection_cleanup = validate_then_create


def held_blocks(vllm_config, policy, prompt_len: int, max_tokens: int) -> int:
    """KV blocks a request alone holds at most, over every KV-cache group (requests.peak_blocks)."""
    model_config, parallel_config = vllm_config.model_config, vllm_config.parallel_config
    groups = layer_groups(vllm_config.additional_config)
    scores_per_token = model_config.get_num_layers(parallel_config) * model_config.get_num_kv_heads(parallel_config)
    return groups * peak_blocks(policy, prompt_len, max_tokens, prefill_chunk_tokens(vllm_config),
                                vllm_config.cache_config.block_size, scores_per_token,
                                max_score_bytes(vllm_config.additional_config))


def too_large_error(vllm_config, request) -> str | None:
    """Why a request can never fit in the KV pool, or None. vLLM's own start-up check makes this
    impossible unless eviction during prefill let max_model_len exceed the pool."""
    base, pool = _state["server_config"], vllm_config.cache_config.num_gpu_blocks
    params = request.sampling_params
    if base is None or not pool or params is None or request.prompt_token_ids is None:
        return None
    usable = pool - 1  # vLLM's block pool holds one null block back
    policy = request_policy(base, params.extra_args, layer_groups(vllm_config.additional_config))
    prompt_len, max_tokens = len(request.prompt_token_ids), params.max_tokens or 1
    need = held_blocks(vllm_config, policy, prompt_len, max_tokens)
    if need <= usable:
        return None
    during = policy is not None and policy.during_prefill
    decode = policy is not None and policy.decode_budget is not None
    output = ("lower the budget or the decode budget" if decode else
              "lower max_tokens (or evict the output too: vllm_xargs {\"kv_eviction_decode_budget\": 256}) "
              "or the budget")
    advice = output if during else \
        "evict during prefill (vllm_xargs {\"kv_eviction_during_prefill\": true}), or send a shorter prompt"
    return (f"KV eviction: this request would hold up to {need} KV-cache blocks at once ({prompt_len}-token prompt, "
            f"up to {max_tokens} output tokens), more than the {usable} the KV cache has; {advice}")


def probe_error(vllm_config, request) -> str | None:
    """Why a request whose early chunks are scored by the question's window run after them
    (`prefill_scores: appended`) cannot be served, or None. The probe rides on a chunk's step as
    rows scheduled at the positions after the chunk: those rows have no prompt logprobs to give,
    the chunk must leave room for them, and vLLM must not fill them from elsewhere (prompt
    embeddings, or video pruning's recomputed positions); with unsplittable images a chunk before
    a large picture could never make room."""
    base, params = _state["server_config"], request.sampling_params
    if base is None or params is None:
        return None
    policy = request_policy(base, params.extra_args, layer_groups(vllm_config.additional_config))
    embeds = getattr(request, "prompt_embeds", None)
    n = len(request.prompt_token_ids) if request.prompt_token_ids is not None else 0 if embeds is None else len(embeds)
    probe = policy.question_probe(n) if policy is not None else 0
    if not probe or policy.kept_tokens(n) >= n:  # nothing evicted, no probe
        return None
    scores_chunk = "send vllm_xargs {\"kv_eviction_prefill_scores\": \"chunk\"}"
    chunk, multimodal = prefill_chunk_tokens(vllm_config), vllm_config.model_config.multimodal_config
    if chunk <= probe:
        return (f"KV eviction with prefill_scores: appended runs the prompt's last {probe} tokens after a prefill "
                f"chunk of at most {chunk} tokens; raise --max-num-batched-tokens above {probe}, lower the window, "
                f"or {scores_chunk}")
    if params.prompt_logprobs is not None:
        return f"KV eviction with prefill_scores: appended cannot return prompt_logprobs; drop them, or {scores_chunk}"
    if embeds is not None:
        return f"KV eviction with prefill_scores: appended needs the prompt's token ids, not embeddings; {scores_chunk}"
    if request.mm_features and (vllm_config.scheduler_config.disable_chunked_mm_input or (
            multimodal is not None and multimodal.is_multimodal_pruning_enabled())):
        return ("KV eviction with prefill_scores: appended cannot run with --disable-chunked-mm-input or video "
                f"pruning; {scores_chunk}")
    return None


def _hook_input_processor(module) -> None:
    """Requests eviction cannot serve are an HTTP 400 in the API server (ValueError offline):
    streaming-input sessions (resumable requests), which replace the prompt between chunks that
    compaction cannot follow, and requests that could never fit in the KV pool (too_large_error),
    which would otherwise wait or be preempted forever."""
    require_supported(module.__name__)
    processor_cls = module.InputProcessor
    process_inputs = processor_cls.process_inputs

    @functools.wraps(process_inputs)
    def process_inputs_for_eviction(self, request_id, prompt, params, *args, **kwargs):
        from vllm.exceptions import VLLMValidationError

        base = _state["server_config"]
        if kwargs.get("resumable") and base is not None and \
                request_policy(base, getattr(params, "extra_args", None)) is not None:
            raise VLLMValidationError("KV eviction does not support streaming-input sessions; send "
                                      "vllm_xargs {\"kv_eviction\": \"none\"} with them", parameter="vllm_xargs")
        request = process_inputs(self, request_id, prompt, params, *args, **kwargs)
        if (error := too_large_error(self.vllm_config, request) or probe_error(self.vllm_config, request)) is not None:
            raise VLLMValidationError(error)
        return request

    processor_cls.process_inputs = process_inputs_for_eviction


def _hook_kv_cache_groups(module) -> None:
    """With --kv-eviction-layer-groups N > 1, vLLM's one full-attention group becomes N groups of
    consecutive layers over the same block pool (its hybrid allocator: per-group block tables,
    one page size), so a bucket that keeps fewer tokens holds fewer blocks. Runs wherever vLLM
    groups layers (engine core; workers when profiling), always with the same answer."""
    require_supported(module.__name__)
    get_kv_cache_groups = module.get_kv_cache_groups

    @functools.wraps(get_kv_cache_groups)
    def get_kv_cache_groups_in_buckets(vllm_config, kv_cache_spec, *args, **kwargs):
        groups = get_kv_cache_groups(vllm_config, kv_cache_spec, *args, **kwargs)
        count = layer_groups(vllm_config.additional_config)
        if count == 1 or engine_config(vllm_config.additional_config) is None:
            return groups
        from .kv_layout import split_into_buckets

        return split_into_buckets(groups, count)

    module.get_kv_cache_groups = get_kv_cache_groups_in_buckets

    # vLLM checks at start-up that one max_model_len request fits in the pool; with eviction
    # during prefill (the engine's default) a max_model_len prompt holds fewer blocks than that
    usage = module._max_memory_usage_bytes_from_groups

    @functools.wraps(usage)
    def usage_of_a_prompt_held_while_evicted(vllm_config, kv_cache_groups, *args, **kwargs):
        config = engine_config(vllm_config.additional_config)
        policy = None if config is None else config.build_policy()
        if policy is None or not policy.during_prefill:
            return usage(vllm_config, kv_cache_groups, *args, **kwargs)
        model_config = vllm_config.model_config
        length = model_config.max_model_len
        blocks = held_blocks(vllm_config, policy, length, 1) // layer_groups(vllm_config.additional_config)
        held = min(length, blocks * vllm_config.cache_config.block_size)
        model_config.max_model_len = held  # vLLM's own estimate varies it the same way
        try:
            return usage(vllm_config, kv_cache_groups, *args, **kwargs)
        finally:
            model_config.max_model_len = length

    module._max_memory_usage_bytes_from_groups = usage_of_a_prompt_held_while_evicted


def _hook_model_runner(module) -> None:
    """Install the worker hooks on each V1 runner once its KV cache exists (runner.py)."""
    runner_cls = module.GPUModelRunner
    initialize_kv_cache = runner_cls.initialize_kv_cache

    @functools.wraps(initialize_kv_cache)
    def initialize_kv_cache_with_eviction(self, kv_cache_config, is_profiling=False, *args, **kwargs):
        initialize_kv_cache(self, kv_cache_config, is_profiling, *args, **kwargs)
        if not is_profiling and engine_config(self.vllm_config.additional_config) is not None:
            require_supported(module.__name__)  # eviction asked for: never run half-hooked
            from .runner import install

            install(self)

    runner_cls.initialize_kv_cache = initialize_kv_cache_with_eviction


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a hook right after a module is first imported, so processes that never import the
    model runner (the API server) or the OpenAI serving code (engine core, workers) never pay for it."""

    def __init__(self, hooks):
        self.hooks = hooks

    def find_spec(self, name, path=None, target=None):
        if name not in self.hooks:
            return None
        sys.meta_path.remove(self)
        try:
            import importlib.util

            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        hook, loader = self.hooks.pop(name), spec.loader
        exec_module = loader.exec_module

        def exec_then_hook(module):
            exec_module(module)
            hook(module)

        loader.exec_module = exec_then_hook
        return spec


def register() -> None:
    """`vllm.general_plugins` entry point: idempotent, cheap, safe on any vLLM version."""
    if _state["registered"]:
        return
    _state["registered"] = True
    _hook_engine_args()  # flags always parse; create_engine_config refuses if unsupported
    if unsupported_reason() is not None:
        return
    _hook_request_validation()
    later = {}
    for module_name, hook in (("vllm.v1.worker.gpu_model_runner", _hook_model_runner),
                              ("vllm.v1.core.kv_cache_utils", _hook_kv_cache_groups),
                              ("vllm.entrypoints.generate.base.serving", _hook_openai_serving),
                              ("vllm.v1.engine.input_processor", _hook_input_processor)):
        if module_name in sys.modules:
            hook(sys.modules[module_name])
        else:
            later[module_name] = hook
    if later:
        sys.meta_path.insert(0, _AfterImport(later))
