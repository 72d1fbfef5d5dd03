"""Entry point (`vllm.general_plugins`) and start-up checks.

register() runs in every vLLM process and is idempotent. It imports only what the calling
process has already imported (vLLM's engine args), adds the CLI flags, and installs the other
hooks lazily. Every hooked vLLM function is listed in HOOKED_SIGNATURES: on another vLLM version
or a changed signature the flags still parse, but asking for eviction fails with one line.
"""
from __future__ import annotations

import argparse
import functools
import importlib.abc
import inspect
import logging
import os
import sys
import tempfile
from typing import Any

from ..config import PRESETS_DIR, EvictionConfig, EvictionConfigError, parse_budget
from ..policies import POLICY_NAMES
from .metrics import ENV_DIR as METRICS_ENV_DIR
from .requests import CONFIG_KEY, engine_config, request_config

SUPPORTED_VLLM = "0.32.0"
logger = logging.getLogger("madakv_vllm")

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
    "vllm.v1.worker.gpu_model_runner": {
        "GPUModelRunner.initialize_kv_cache": ("self", "kv_cache_config", "is_profiling"),
        "GPUModelRunner._update_states": ("self", "scheduler_output"),
        "GPUModelRunner._prepare_inputs": ("self", "scheduler_output", "num_scheduled_tokens"),
        "GPUModelRunner.execute_model": ("self", "scheduler_output"),
    },
}

_state: dict[str, Any] = {"registered": False, "server_config": None}


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
                            "the budget; 32 when not given.")
    group.add_argument("--kv-eviction-config", default=None, metavar="FILE.yaml",
                       help=f"Eviction preset (YAML); flags override it. Presets: {PRESETS_DIR}.")


def config_from_args(args: argparse.Namespace) -> EvictionConfig | None:
    """The eviction config the CLI flags describe, or None if no flag was given."""
    path = getattr(args, "kv_eviction_config", None)
    flags = dict(policy=getattr(args, "kv_eviction", None), budget=getattr(args, "kv_eviction_budget", None),
                 window=getattr(args, "kv_eviction_window", None))
    if path is None and all(v is None for v in flags.values()):
        return None
    base = EvictionConfig.from_yaml(path) if path else EvictionConfig(policy="madakv")
    if flags["budget"] is not None:
        flags["budget"] = parse_budget(flags["budget"])
    return base.merged(**flags)


def config_as_dict(config: EvictionConfig) -> dict[str, Any]:
    return {"policy": config.policy, "budget": config.budget, "window": config.window, **config.options}


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
    mode = vllm_config.compilation_config.cudagraph_mode
    if mode is not None and mode == CUDAGraphMode.FULL:
        raise EvictionStartupError("KV eviction cannot run with cudagraph mode FULL (prefill steps must run "
                                   "eagerly to be scored); use FULL_AND_PIECEWISE (the default) or PIECEWISE")


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
        if config is not None:
            engine_args.additional_config = {**(engine_args.additional_config or {}),
                                             CONFIG_KEY: config_as_dict(config)}
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
        except EvictionConfigError as exc:
            _fail(self, exc)
        scheduler_config = vllm_config.scheduler_config
        if scheduler_config.scheduler_cls not in (None, "vllm.v1.core.sched.scheduler.Scheduler",
                                                  "vllm.v1.core.sched.async_scheduler.AsyncScheduler"):
            _fail(self, EvictionStartupError(f"KV eviction brings its own scheduler; it cannot be combined with "
                                             f"--scheduler-cls {scheduler_config.scheduler_cls}"))
        name = "AsyncEvictingScheduler" if scheduler_config.async_scheduling else "EvictingScheduler"
        scheduler_config.scheduler_cls = f"madakv_vllm.vllm.scheduler.{name}"
        vllm_config.additional_config[CONFIG_KEY] = config_as_dict(config)
        _state["server_config"] = config
        logger.info("KV eviction: %s (budget %s, window %d)", config.policy, config.budget, config.window)
        return vllm_config

    EngineArgs.add_cli_args = staticmethod(add_cli_args_with_eviction)
    EngineArgs.from_cli_args = classmethod(from_cli_args_with_eviction)
    EngineArgs.create_engine_config = create_engine_config_with_eviction


def _hook_request_validation() -> None:
    """Bad per-request overrides become a VLLMValidationError (HTTP 400) in the API server."""
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    verify = SamplingParams._verify_extra_args

    @functools.wraps(verify)
    def verify_with_eviction(self):
        verify(self)
        base = _state["server_config"]
        if base is not None:
            try:
                request_config(base, self.extra_args)
            except EvictionConfigError as exc:
                raise VLLMValidationError(str(exc), parameter="vllm_xargs") from None

    SamplingParams._verify_extra_args = verify_with_eviction


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
    model runner (the API server) never pay for it."""

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
    module_name = "vllm.v1.worker.gpu_model_runner"
    if module_name in sys.modules:
        _hook_model_runner(sys.modules[module_name])
    else:
        sys.meta_path.insert(0, _AfterImport({module_name: _hook_model_runner}))
