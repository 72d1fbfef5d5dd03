"""What this plugin needs from vLLM, checked once: the version, the signatures of every hooked
function, and the configurations eviction cannot run correctly with (refused in one line).

No hooks here and no imports of the other seam modules, so every side (API server, scheduler,
worker) can call these checks without import cycles.
"""
from __future__ import annotations

import inspect
from typing import Any

from ..config import EvictionConfigError

SUPPORTED_VLLM = "0.32.0"
# module -> {qualified function: parameter names we rely on}
HOOKED_SIGNATURES: dict[str, dict[str, tuple[str, ...]]] = {
    "vllm.engine.arg_utils": {
        "EngineArgs.add_cli_args": ("parser",),
        "EngineArgs.from_cli_args": ("args",),
        "EngineArgs.create_engine_config": ("self", "usage_context", "headless"),
    },
    "vllm.sampling_params": {"SamplingParams._verify_extra_args": ("self",)},
    "vllm.v1.core.sched.scheduler": {
        "Scheduler._reserve_prefill_lookahead": ("self", "request", "num_computed_tokens", "num_new_tokens"),
        "Scheduler.schedule": ("self", "throttle_prefills"),
        "Scheduler.update_from_output": ("self", "scheduler_output", "model_runner_output"),
        "Scheduler.add_request": ("self", "request"),
        "Scheduler.reset_prefix_cache": ("self", "reset_running_requests"),
    },
    "vllm.v1.core.kv_cache_manager": {
        "KVCacheManager.get_computed_blocks": ("self", "request"),
        "KVCacheManager.truncate_computed_blocks": ("self", "blocks", "num_computed_tokens"),
    },
    "vllm.v1.core.single_type_kv_cache_manager": {
        "SingleTypeKVCacheManager.get_num_blocks_to_allocate": ("self", "request_id", "num_tokens"),
        "SingleTypeKVCacheManager.allocate_new_blocks": ("self", "request_id", "num_tokens",
                                                         "num_tokens_main_model"),
        "SingleTypeKVCacheManager.cache_blocks": ("self", "request", "num_tokens"),
        "SingleTypeKVCacheManager.pop_blocks_for_free": ("self", "request_id"),
    },
    "vllm.entrypoints.generate.base.serving": {
        "GenerateBaseServing._with_kv_transfer_rejection_cleanup": ("self", "awaitable", "request", "raw_request"),
        "GenerateBaseServing.create_error_response": ("message", "err_type", "status_code", "param"),
    },
    "vllm.v1.attention.backends.cpu_attn": {
        "_get_attn_isa": ("dtype", "block_size", "head_size", "kv_cache_dtype"),
    },
    "vllm.v1.engine.input_processor": {
        "InputProcessor.process_inputs": ("self", "request_id", "prompt", "params", "supported_tasks"),
    },
    "vllm.v1.core.kv_cache_utils": {"get_kv_cache_groups": ("vllm_config", "kv_cache_spec"),
                                    "_max_memory_usage_bytes_from_groups": ("vllm_config", "kv_cache_groups")},
    "vllm.v1.worker.utils": {
        "AttentionGroup.build_metadata": ("self", "common_attn_metadata", "ubatch_idx"),
        "AttentionGroup.build_metadata_for_cudagraph_capture": ("self", "common_attn_metadata", "ubatch_idx"),
    },
    "vllm.v1.worker.gpu_model_runner": {
        "GPUModelRunner.initialize_kv_cache": ("self", "kv_cache_config", "is_profiling"),
        "GPUModelRunner.sample_tokens": ("self", "grammar_output"),
        "GPUModelRunner._update_states": ("self", "scheduler_output"),
        "GPUModelRunner._prepare_inputs": ("self", "scheduler_output", "num_scheduled_tokens"),
        "GPUModelRunner.execute_model": ("self", "scheduler_output"),
        "GPUModelRunner._make_buffer": ("self", "size", "dtype"),
        "GPUModelRunner._determine_batch_execution_and_padding": (
            "self", "num_tokens", "num_reqs", "num_scheduled_tokens_np", "max_num_scheduled_tokens",
            "use_cascade_attn", "allow_microbatching", "force_eager", "force_uniform_decode"),
    },
}

class EvictionStartupError(EvictionConfigError):
    """Eviction was asked for but cannot run correctly here."""


def signature_problems(module_name: str) -> list[str]:
    """Hooked functions of one module whose parameters no longer start as we expect."""
    import importlib

    module = importlib.import_module(module_name)
    problems = []
    for qualname, expected in HOOKED_SIGNATURES[module_name].items():
        obj: Any = module
        for part in qualname.split("."):
            obj = getattr(obj, part, None)
        if obj is None:
            problems.append(f"{module_name}.{qualname} is missing")
            continue
        params = tuple(inspect.signature(obj).parameters)
        if params[: len(expected)] != expected:
            problems.append(f"{module_name}.{qualname}{params} no longer starts with {expected}")
    return problems


FRONTEND_MODULES = ("vllm.engine.arg_utils", "vllm.sampling_params")  # already imported in every process


def unsupported_reason(modules=FRONTEND_MODULES) -> str | None:
    """Why eviction cannot run on this vLLM (version, or hooked signatures of `modules`)."""
    import vllm

    if vllm.__version__ != SUPPORTED_VLLM:
        return f"madakv-vllm supports vLLM {SUPPORTED_VLLM}, found {vllm.__version__}"
    problems = [p for module in modules for p in signature_problems(module)]
    return "vLLM internals changed: " + "; ".join(problems) if problems else None


def require_supported(*modules: str) -> None:
    """Called where the engine core and workers install hooks: fail loudly, never half-hook."""
    if (reason := unsupported_reason(modules)) is not None:
        raise RuntimeError(f"madakv-vllm cannot hook this vLLM: {reason}")


# ---- start-up checks ----------------------------------------------------------------------------
def check_engine_args(engine_args) -> None:
    """What we refuse before vLLM builds anything (one line each)."""
    if engine_args.speculative_config:
        raise EvictionStartupError("KV eviction does not support speculative decoding yet; drop it or "
                                   "use --kv-eviction none")
    if (engine_args.pipeline_parallel_size or 1) > 1:
        raise EvictionStartupError("KV eviction does not support pipeline parallelism yet")
    if engine_args.kv_transfer_config is not None:
        raise EvictionStartupError("KV eviction does not support KV connectors (--kv-transfer-config) yet")


def check_vllm_config(vllm_config) -> None:
    """What we refuse once the model and compilation settings are known."""
    from vllm.config import CUDAGraphMode

    model = vllm_config.model_config
    if model.runner_type != "generate":
        raise EvictionStartupError(f"KV eviction applies to generative models, not runner {model.runner_type!r}")
    if model.use_mla:
        raise EvictionStartupError(f"{model.model}: MLA attention is not supported by KV eviction yet")
    if model.is_hybrid or model.is_attention_free:
        raise EvictionStartupError(f"{model.model}: hybrid or attention-free models are not supported by KV "
                                   f"eviction yet")
    text_config = model.hf_text_config
    layer_types = set(getattr(text_config, "layer_types", None) or ["full_attention"])
    if model.get_sliding_window() is not None or layer_types - {"full_attention"}:
        raise EvictionStartupError(f"{model.model}: decoder layers must all be full attention for KV eviction "
                                   f"(found sliding window or {sorted(layer_types)})")
    if getattr(model, "is_mm_prefix_lm", False):
        raise EvictionStartupError(f"{model.model}: its image tokens attend to each other bidirectionally (prefix-LM "
                                   f"multimodal attention), which a compaction during a re-prefill would break; "
                                   f"KV eviction supports causal attention only")
    if uses_alibi(model):
        raise EvictionStartupError(f"{model.model}: ALiBi attention biases by the physical key index, which "
                                   f"compaction changes; KV eviction supports rotary positions only")
    if (heads := kv_heads_per_layer(text_config)) is not None and len(set(heads)) > 1:
        raise EvictionStartupError(f"{model.model}: layers have different KV-head counts {sorted(set(heads))}; "
                                   f"KV eviction needs the same count in every layer")
    if getattr(vllm_config, "kv_transfer_config", None) is not None:  # also set by --kv-offloading-size
        raise EvictionStartupError("KV eviction does not support KV connectors or KV offloading "
                                   "(--kv-transfer-config, --kv-offloading-size) yet")
    mode = vllm_config.compilation_config.cudagraph_mode
    if mode is not None and mode == CUDAGraphMode.FULL:
        raise EvictionStartupError("KV eviction cannot run with cudagraph mode FULL (prefill steps must run "
                                   "eagerly to be scored); use FULL_AND_PIECEWISE (the default) or PIECEWISE")
    check_parallel_and_runner(vllm_config)
    check_cpu_kv_layout(vllm_config)


def check_cpu_kv_layout(vllm_config) -> None:
    """vLLM's CPU backend stores bf16 caches in AMX tiles (block sizes that are multiples of 32, on
    CPUs with AMX): keys and values interleaved in pairs inside 16-token tiles, which the scoring
    and compaction kernels cannot address. Refused here in one line rather than by the worker's
    layout probe at start-up (a traceback deep in the engine)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    module = "vllm.v1.attention.backends.cpu_attn"
    require_supported(module)
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    model, cache = vllm_config.model_config, vllm_config.cache_config
    isa = _get_attn_isa(model.dtype, cache.block_size, model.get_head_size(), cache.cache_dtype)
    if isa == "amx":
        raise EvictionStartupError(f"this CPU stores {model.dtype} KV blocks in AMX tiles, a layout KV eviction "
                                   f"does not support yet; use --dtype float32 on this machine")


def check_parallel_and_runner(vllm_config) -> None:
    """Settings that change what the hooked code sees (also checked again by the scheduler,
    which runs in the engine core with the final config)."""
    parallel = vllm_config.parallel_config
    for name in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        if getattr(parallel, name, 1) > 1:
            raise EvictionStartupError(f"KV eviction does not support context parallelism ({name} = "
                                       f"{getattr(parallel, name)}): the scheduler's block size spans the ranks, "
                                       f"the workers' does not")
    if getattr(parallel, "enable_dbo", False):
        raise EvictionStartupError("KV eviction does not support dual-batch overlap (--enable-dbo): scoring rows "
                                   "index the whole batch, not a micro-batch")
    if vllm_config.use_v2_model_runner:
        raise EvictionStartupError("KV eviction hooks vLLM's V1 model runner, but this configuration forces Model "
                                   "Runner V2 (e.g. --watermark-config or HiSparse); drop that setting or use "
                                   "--kv-eviction none")


# `--kv-eviction-layer-groups auto`: one KV-cache group per bucket of layers, at most this many
# buckets (the largest divisor of the layer count not above it). See docs/serving.md "Layer groups".
AUTO_LAYER_GROUPS_MAX = 4


def resolve_layer_groups(requested, vllm_config) -> int:
    """The number of KV-cache groups (equal buckets of consecutive layers) for `requested`: an
    integer, "auto" or None (= 1: every layer keeps the same count)."""
    if requested is None:
        return 1
    num_layers = vllm_config.model_config.get_total_num_hidden_layers()
    divisors = [d for d in range(1, num_layers + 1) if num_layers % d == 0]
    if requested == "auto":
        groups = max(d for d in divisors if d <= AUTO_LAYER_GROUPS_MAX)
    else:
        try:
            groups = int(requested)
        except (TypeError, ValueError):
            groups = 0
        if isinstance(requested, bool) or groups < 1 or str(groups) != str(requested).strip():
            raise EvictionStartupError(f"--kv-eviction-layer-groups must be a positive integer or auto, got "
                                       f"{requested!r}")
        if groups not in divisors:
            raise EvictionStartupError(f"--kv-eviction-layer-groups {groups}: the {num_layers} layers must split into "
                                       f"equal buckets; choose one of {', '.join(map(str, divisors))} or auto")
    if groups > 1 and vllm_config.scheduler_config.disable_hybrid_kv_cache_manager:
        raise EvictionStartupError("--kv-eviction-layer-groups > 1 needs vLLM's hybrid KV-cache manager (one block "
                                   "pool for several groups); drop --disable-hybrid-kv-cache-manager")
    return groups


ALIBI_MODEL_TYPES = ("bloom", "mpt", "step1")


def uses_alibi(model_config) -> bool:
    text = model_config.hf_text_config
    return (getattr(text, "model_type", None) in ALIBI_MODEL_TYPES or bool(getattr(text, "alibi", False))
            or bool(getattr(text, "use_alibi", False)) or getattr(text, "position_embedding_type", None) == "alibi")


def kv_heads_per_layer(text_config) -> list | None:
    """Per-layer KV-head counts where a config declares them (DeciLM / Nemotron-NAS block configs,
    or a list-valued num_key_value_heads); None for the usual uniform configs."""
    heads = getattr(text_config, "num_key_value_heads", None)
    if isinstance(heads, (list, tuple)):
        return list(heads)
    blocks = getattr(text_config, "block_configs", None)
    if not blocks:
        return None
    total = getattr(text_config, "num_attention_heads", 0)
    counts = []
    for block in blocks:
        attention = getattr(block, "attention", None)
        group = getattr(attention, "n_heads_in_group", None) if attention is not None else None
        if attention is not None and not getattr(attention, "no_op", False) and group:
            counts.append(total // group)
    return counts


