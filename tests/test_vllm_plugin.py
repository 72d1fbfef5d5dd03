"""The plugin's flags, start-up checks and version gate (no engine started)."""
import argparse
import json
import os
from types import SimpleNamespace

import pytest
import torch

from madakv_vllm.config import PRESETS_DIR, EvictionConfig, EvictionConfigError
from madakv_vllm.vllm import compat, plugin
from madakv_vllm.vllm.requests import eviction_target, request_config, request_policy


def parse(*flags):
    parser = argparse.ArgumentParser()
    plugin.add_cli_flags(parser)
    return parser.parse_args(list(flags))


def test_flags_build_the_config():
    assert plugin.config_from_args(parse()) is None
    config = plugin.config_from_args(parse("--kv-eviction", "snapkv", "--kv-eviction-budget", "256"))
    assert (config.policy, config.budget, config.window, config.build_policy().window) == ("snapkv", 256, None, 32)
    assert "window" not in config.as_mapping()  # the workers use the policy's own default
    preset = plugin.config_from_args(parse("--kv-eviction-config", str(PRESETS_DIR / "madakv-10.yaml"),
                                           "--kv-eviction-window", "16"))
    assert (preset.policy, preset.budget, preset.window, preset.options["theta"]) == ("madakv", 0.1, 16, 0.9)
    assert preset.as_mapping()["theta"] == 0.9
    with pytest.raises(EvictionConfigError, match="ratio must be in"):
        plugin.config_from_args(parse("--kv-eviction", "madakv", "--kv-eviction-budget", "2.5"))


def test_vllm_parser_gets_the_flag_group(tiny_model_dir):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    plugin.register()
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", str(tiny_model_dir("qwen2vl")), "--kv-eviction", "madakv",
                              "--kv-eviction-budget", "0.1"])
    engine_args = EngineArgs.from_cli_args(args)
    assert engine_args.additional_config["kv_eviction"]["budget"] == 0.1
    assert any(g.title == "KVEvictionConfig" for g in parser._action_groups)


def test_installed_vllm_is_supported_and_signature_changes_are_caught(monkeypatch):
    assert compat.unsupported_reason(tuple(compat.HOOKED_SIGNATURES)) is None
    from vllm.v1.core.sched.scheduler import Scheduler

    monkeypatch.setattr(Scheduler, "_reserve_prefill_lookahead", lambda self, req, n: n)
    reason = compat.unsupported_reason(("vllm.v1.core.sched.scheduler",))
    assert reason and "_reserve_prefill_lookahead" in reason
    with pytest.raises(RuntimeError, match="cannot hook this vLLM"):
        compat.require_supported("vllm.v1.core.sched.scheduler")
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    assert "supports vLLM 0.32.0, found 0.33.0" in compat.unsupported_reason(())


@pytest.mark.parametrize("engine_args, message", [
    (dict(speculative_config={"method": "ngram"}), "speculative decoding"),
    (dict(pipeline_parallel_size=2), "pipeline parallelism"),
    (dict(kv_transfer_config={"kv_connector": "X"}), "KV connectors"),
])
def test_engine_arg_refusals(engine_args, message):
    defaults = dict(speculative_config=None, pipeline_parallel_size=1, kv_transfer_config=None)
    with pytest.raises(compat.EvictionStartupError, match=message):
        compat.check_engine_args(SimpleNamespace(**{**defaults, **engine_args}))


def fake_vllm_config(**model_overrides):
    from vllm.config import CUDAGraphMode

    text = SimpleNamespace(layer_types=None)
    model = dict(runner_type="generate", use_mla=False, is_hybrid=False, is_attention_free=False, model="m",
                 hf_text_config=text, get_sliding_window=lambda: None, dtype=torch.float32, get_head_size=lambda: 64)
    cache = SimpleNamespace(block_size=model_overrides.pop("block_size", 32), cache_dtype="auto")
    parallel = dict(decode_context_parallel_size=1, prefill_context_parallel_size=1, enable_dbo=False)
    v2 = model_overrides.pop("use_v2_model_runner", False)
    parallel.update({k: model_overrides.pop(k) for k in list(model_overrides) if k in parallel})
    model.update(model_overrides)
    return SimpleNamespace(model_config=SimpleNamespace(**model), parallel_config=SimpleNamespace(**parallel),
                           use_v2_model_runner=v2, cache_config=cache,
                           compilation_config=SimpleNamespace(cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE))


@pytest.mark.parametrize("overrides, message", [
    (dict(use_mla=True), "MLA"),
    (dict(is_hybrid=True), "hybrid"),
    (dict(get_sliding_window=lambda: 4096), "full attention"),
    (dict(hf_text_config=SimpleNamespace(layer_types=["full_attention", "sliding_attention"])), "full attention"),
    (dict(runner_type="pooling"), "generative"),
    (dict(is_mm_prefix_lm=True), "bidirectionally"),  # PaliGemma: image tokens see each other
    (dict(hf_text_config=SimpleNamespace(model_type="bloom")), "ALiBi"),
    (dict(hf_text_config=SimpleNamespace(model_type="falcon", alibi=True)), "ALiBi"),
    (dict(hf_text_config=SimpleNamespace(num_key_value_heads=[8, 8, 2])), "different KV-head counts"),
    (dict(hf_text_config=SimpleNamespace(num_attention_heads=32, block_configs=[
        SimpleNamespace(attention=SimpleNamespace(no_op=False, n_heads_in_group=4)),
        SimpleNamespace(attention=SimpleNamespace(no_op=True, n_heads_in_group=None)),
        SimpleNamespace(attention=SimpleNamespace(no_op=False, n_heads_in_group=8))])), "different KV-head counts"),
    (dict(decode_context_parallel_size=2), "context parallelism"),
    (dict(prefill_context_parallel_size=2), "context parallelism"),
    (dict(enable_dbo=True), "dual-batch overlap"),
    (dict(use_v2_model_runner=True), "Model Runner V2"),
])
def test_model_refusals(overrides, message):
    compat.check_vllm_config(fake_vllm_config())  # the plain case passes
    with pytest.raises(compat.EvictionStartupError, match=message):
        compat.check_vllm_config(fake_vllm_config(**overrides))


def test_kv_connectors_set_by_vllm_itself_are_refused():
    """--kv-offloading-size makes vLLM add an offloading connector while it builds the config,
    after the engine-args check: the final config is checked too."""
    config = fake_vllm_config()
    config.kv_transfer_config = SimpleNamespace(kv_connector="OffloadingConnector")
    with pytest.raises(compat.EvictionStartupError, match="KV offloading"):
        compat.check_vllm_config(config)


def test_full_cudagraphs_refused():
    from vllm.config import CUDAGraphMode

    config = fake_vllm_config()
    config.compilation_config.cudagraph_mode = CUDAGraphMode.FULL
    with pytest.raises(compat.EvictionStartupError, match="cudagraph mode FULL"):
        compat.check_vllm_config(config)


def test_request_overrides_and_targets():
    base = EvictionConfig(policy="madakv", budget=0.2, window=8)
    assert request_config(base, None) is base
    assert request_config(base, {"kv_eviction_budget": 0.5}).budget == 0.5
    assert request_policy(base, {"kv_eviction": "none"}) is None
    policy = request_policy(base, {"kv_eviction": "snapkv"})
    assert policy.name == "snapkv" and policy.layer_buckets == 1
    with pytest.raises(EvictionConfigError, match="bad vllm_xargs"):
        request_config(base, {"kv_eviction_budget": "lots"})
    assert request_policy(base, {"kv_eviction_budget": "lots"}).budget == 0.2  # workers never fail on it
    target = eviction_target(request_policy(base, None), 1000)
    assert (target.kept, target.evicted, target.score_queries) == (200, 800, 8)
    assert eviction_target(request_policy(base, None), 8) is None  # the window is the whole prompt


BAD_XARGS = [
    {"kv_eviction_budget": float("nan")}, {"kv_eviction_budget": float("inf")}, {"kv_eviction_budget": -0.1},
    {"kv_eviction_budget": 0}, {"kv_eviction_budget": 0.0}, {"kv_eviction_budget": True},
    {"kv_eviction_budget": [0.2]}, {"kv_eviction_budget": {"a": 1}}, {"kv_eviction_budget": 10**30},
    {"kv_eviction_budget": "lots"}, {"kv_eviction_window": -1}, {"kv_eviction_window": 2**40},
    {"kv_eviction_window": "8"}, {"kv_eviction_window": 8.0}, {"kv_eviction_window": False},
    {"kv_eviction_window": None, "kv_eviction": ["madakv"]}, {"kv_eviction": 3}, {"kv_eviction": "fastkv"},
    {"kv_eviction_budget": 16, "kv_eviction_window": 16},
]


@pytest.mark.parametrize("xargs", BAD_XARGS, ids=repr)
def test_request_values_that_cannot_be_honoured_are_refused(xargs):
    base = EvictionConfig(policy="madakv", budget=0.2, window=8)
    with pytest.raises(EvictionConfigError, match="bad vllm_xargs"):
        request_config(base, xargs)


def test_any_accepted_request_values_give_a_target_a_worker_can_run():
    """Seeded property test: for arbitrary vllm_xargs values and prompt lengths, either the API
    server refuses them (EvictionConfigError -> HTTP 400) or every prompt length gets no eviction
    or a target with 1 <= kept < prompt and 1..prompt scoring queries (the worker divides by both)."""
    import random

    from prompts import random_xargs

    rng = random.Random(0)
    base = EvictionConfig(policy="madakv", budget=0.2, window=8)
    accepted = refused = evicting = 0
    for _ in range(3000):
        xargs = random_xargs(rng)
        try:
            request_config(base, xargs)
        except EvictionConfigError:
            refused += 1
            continue
        accepted += 1
        policy = request_policy(base, xargs)
        for prompt_len in (1, 2, 3, rng.randint(4, 64), rng.randint(65, 20000)):
            target = eviction_target(policy, prompt_len)
            if target is None:
                continue
            evicting += 1
            assert 1 <= target.kept < prompt_len, (xargs, prompt_len, target)
            if policy.needs_scores:
                assert 1 <= target.score_queries <= prompt_len, (xargs, prompt_len, target)
    assert accepted > 300 and refused > 300 and evicting > 300, (accepted, refused, evicting)


def test_a_budget_that_rounds_to_zero_keeps_one_token():
    """The crash that took a server down: window 0 at budget 0.2 on a 2-token prompt kept 0 tokens."""
    base = EvictionConfig(policy="madakv", budget=0.2, window=8)
    target = eviction_target(request_policy(base, {"kv_eviction_window": 0}), 2)
    assert (target.kept, target.score_queries) == (1, 1)
    keep = request_policy(base, {"kv_eviction_window": 0}).select(torch.rand(3, 2, 2), torch.zeros(2, dtype=torch.int8))
    assert [k.shape for k in keep] == [(2, 1)] * 3


def test_bad_request_override_is_a_validation_error(monkeypatch):
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    plugin.register()
    monkeypatch.setitem(plugin._state, "server_config", EvictionConfig(policy="madakv", budget=0.2, window=8))
    SamplingParams(extra_args={"kv_eviction_budget": 0.5})
    with pytest.raises(VLLMValidationError, match="budget"):
        SamplingParams(extra_args={"kv_eviction_budget": 7.5})


def test_each_engine_gets_its_own_metrics_folder(tiny_model_dir, monkeypatch, tmp_path):
    """An inherited folder (a parent that ran its own engine) must not mix its counters in."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import load_general_plugins

    from madakv_vllm.vllm.metrics import ENV_DIR

    load_general_plugins()
    monkeypatch.setenv(ENV_DIR, str(tmp_path))
    args = EngineArgs(model=str(tiny_model_dir("qwen2vl")), max_model_len=512, enforce_eager=True, dtype="float32",
                      additional_config={"kv_eviction": {"policy": "madakv"}})
    args.create_engine_config()
    first = os.environ[ENV_DIR]
    args.create_engine_config()
    assert first != str(tmp_path) and os.path.isdir(first) and os.environ[ENV_DIR] != first


def cudagraph_runner(mode):
    """Just enough of a GPU model runner for vLLM's own batch-execution decision, with vLLM's own
    cudagraph dispatcher for `mode` (graphs for 1-8 tokens)."""
    from vllm.config import CompilationConfig, CompilationMode, VllmConfig
    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    config = VllmConfig()  # on this CPU machine its post-init turns graphs off: set them after
    compilation = config.compilation_config
    compilation.cudagraph_mode, compilation.mode = mode, CompilationMode.VLLM_COMPILE
    compilation.cudagraph_capture_sizes, compilation.max_cudagraph_capture_size = [1, 2, 4, 8], 8
    compilation.splitting_ops = list(CompilationConfig._attention_ops)
    dispatcher = CudagraphDispatcher(config)
    dispatcher.initialize_cudagraph_keys(mode, 1)
    runner = SimpleNamespace(uniform_decode_query_len=1, model_config=SimpleNamespace(is_encoder_decoder=False),
                             input_batch=SimpleNamespace(lora_id_to_lora_request={}), cudagraph_dispatcher=dispatcher,
                             vllm_config=config, _is_uniform_decode=GPUModelRunner._is_uniform_decode)
    return lambda *a, **k: GPUModelRunner._determine_batch_execution_and_padding(runner, *a, **k)


@pytest.mark.parametrize("mode_name, while_scoring", [("FULL_AND_PIECEWISE", "PIECEWISE"),
                                                      ("FULL_DECODE_ONLY", "NONE"), ("PIECEWISE", "PIECEWISE")])
def test_steps_with_scoring_rows_never_replay_full_cudagraphs(mode_name, while_scoring):
    """Four requests with one scheduled token each look like a uniform decode: vLLM would replay
    a FULL graph, in which the per-layer scoring never runs. With scoring rows the step is
    dispatched as a mixed batch; without them vLLM's own decision is unchanged."""
    import numpy as np
    from vllm.config import CUDAGraphMode

    from madakv_vllm.vllm.runner import without_full_graphs_while_scoring

    mode = CUDAGraphMode[mode_name]
    scoring = {"rows": False}
    determine = without_full_graphs_while_scoring(cudagraph_runner(mode), lambda: scoring["rows"])
    step = dict(num_tokens=4, num_reqs=4, num_scheduled_tokens_np=np.ones(4, dtype=np.int32),
                max_num_scheduled_tokens=1)
    stock_mode = determine(**step)[0]
    assert stock_mode == (CUDAGraphMode.PIECEWISE if mode_name == "PIECEWISE" else CUDAGraphMode.FULL)
    scoring["rows"] = True
    graph_mode, batch, *_ = determine(**step)
    assert graph_mode == CUDAGraphMode[while_scoring] and not batch.uniform


@pytest.mark.parametrize("amx, dtype, block_size, refused", [
    (True, torch.bfloat16, 128, True), (True, torch.bfloat16, 16, False), (True, torch.float32, 128, False),
    (False, torch.bfloat16, 128, False)])
def test_cpu_amx_kv_layout_is_refused_in_one_line(monkeypatch, amx, dtype, block_size, refused):
    """vLLM's CPU backend keeps bf16 blocks of 32k tokens in AMX tiles on CPUs that have AMX."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    config = fake_vllm_config(dtype=dtype, block_size=block_size)
    if refused:
        with pytest.raises(compat.EvictionStartupError, match="AMX tiles"):
            compat.check_vllm_config(config)
    else:
        compat.check_vllm_config(config)


def test_model_runner_v2_forced_by_other_settings_is_refused(monkeypatch):
    """The env var says V1, but a watermark config forces V2 in vLLM's own final decision."""
    from vllm.config import VllmConfig

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    config = VllmConfig()
    compat.check_parallel_and_runner(config)  # V1: fine
    object.__setattr__(config, "watermark_config", object())
    assert config.use_v2_model_runner
    with pytest.raises(compat.EvictionStartupError, match="Model Runner V2"):
        compat.check_parallel_and_runner(config)


def test_streaming_input_sessions_with_eviction_are_a_validation_error(monkeypatch):
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    plugin.register()
    from vllm.v1.engine.input_processor import InputProcessor

    monkeypatch.setitem(plugin._state, "server_config", EvictionConfig(policy="madakv", budget=0.2, window=8))
    with pytest.raises(VLLMValidationError, match="streaming-input sessions"):
        InputProcessor.process_inputs(None, "r", {"prompt_token_ids": [1]}, SamplingParams(), (), resumable=True)
    # eviction off for the request, or not a session: vLLM's own code runs (and fails on the stand-in self)
    for params, resumable in ((SamplingParams(extra_args={"kv_eviction": "none"}), True), (SamplingParams(), False)):
        with pytest.raises(AttributeError):
            InputProcessor.process_inputs(None, "r", {"prompt_token_ids": [1]}, params, (), resumable=resumable)


def test_requests_whose_scores_would_not_fit_run_without_eviction(monkeypatch):
    """Scores are fp32 [layers, kv_heads, prompt] outside vLLM's memory budget until the plan."""
    from madakv_vllm.vllm import requests

    policy = request_policy(EvictionConfig(policy="madakv", budget=0.2, window=8), None)
    limit = 4 * 32 * 8 * 1000
    assert eviction_target(policy, 1000, scores_per_token=32 * 8, score_bytes_limit=limit).kept == 200  # at the limit
    assert eviction_target(policy, 1001, scores_per_token=32 * 8, score_bytes_limit=limit) is None
    streaming = request_policy(EvictionConfig(policy="streamingllm", budget=0.2, window=8), None)
    assert eviction_target(streaming, 10**6, scores_per_token=32 * 8, score_bytes_limit=limit) is not None  # no scores
    # the limit travels in the engine config, read from the environment once, where it is made:
    # the scheduler and workers (other processes, other nodes) never read their own
    monkeypatch.setenv(requests.MAX_SCORE_BYTES_ENV, str(limit))
    assert requests.max_score_bytes_from_env() == limit
    assert requests.max_score_bytes({requests.MAX_SCORE_BYTES_KEY: limit}) == limit
    assert requests.max_score_bytes({}) == requests.MAX_SCORE_BYTES  # not the environment's
    monkeypatch.setenv(requests.MAX_SCORE_BYTES_ENV, "1GiB")
    with pytest.raises(EvictionConfigError, match="MADAKV_MAX_SCORE_BYTES must be a byte count"):
        requests.max_score_bytes_from_env()


# ---- layer groups (regime B) ---------------------------------------------------------------------
def groups_config(num_layers: int, disable_hybrid: bool = False):
    return SimpleNamespace(model_config=SimpleNamespace(get_total_num_hidden_layers=lambda: num_layers),
                           scheduler_config=SimpleNamespace(disable_hybrid_kv_cache_manager=disable_hybrid))


@pytest.mark.parametrize("requested, layers, groups", [(None, 30, 1), ("1", 30, 1), (5, 30, 5), ("30", 30, 30),
                                                       ("auto", 30, 3), ("auto", 28, 4), ("auto", 2, 2),
                                                       ("auto", 7, 1)])
def test_layer_groups_resolve_to_equal_buckets(requested, layers, groups):
    assert compat.resolve_layer_groups(requested, groups_config(layers)) == groups


@pytest.mark.parametrize("requested, disable_hybrid, message", [
    ("4", False, "choose one of 1, 2, 3, 5, 6, 10, 15, 30 or auto"),
    ("0", False, "positive integer or auto"), ("two", False, "positive integer or auto"),
    ("2.5", False, "positive integer or auto"), (True, False, "positive integer or auto"),
    ("2", True, "--disable-hybrid-kv-cache-manager"),
])
def test_bad_layer_groups_are_one_line(requested, disable_hybrid, message):
    with pytest.raises(compat.EvictionStartupError, match=message):
        compat.resolve_layer_groups(requested, groups_config(30, disable_hybrid))


def test_layer_groups_flag_reaches_the_engine_config(tiny_model_dir, capsys):
    """From the CLI to VllmConfig.additional_config (resolved), and refused without --kv-eviction."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from madakv_vllm.vllm.requests import LAYER_GROUPS_KEY, layer_groups

    plugin.register()
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    model = ["--model", str(tiny_model_dir("qwen2vl")), "--max-model-len", "512", "--dtype", "float32"]
    args = parser.parse_args(model + ["--kv-eviction", "pyramidkv", "--kv-eviction-layer-groups", "auto"])
    config = EngineArgs.from_cli_args(args).create_engine_config()
    assert layer_groups(config.additional_config) == 2  # the tiny model has 2 layers
    with pytest.raises(SystemExit):
        EngineArgs.from_cli_args(parser.parse_args(model + ["--kv-eviction-layer-groups", "2"]))
    assert "needs --kv-eviction" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        EngineArgs.from_cli_args(parser.parse_args(model + ["--kv-eviction", "madakv", "--kv-eviction-layer-groups",
                                                            "3"])).create_engine_config()
    assert "choose one of 1, 2 or auto" in capsys.readouterr().err
    assert LAYER_GROUPS_KEY not in (EngineArgs.from_cli_args(parser.parse_args(model)).additional_config or {})


def test_per_layer_counter_is_parsed_from_the_metrics_page():
    from madakv_vllm.vllm.metrics import METRIC_LAYER_KEPT, parse_metrics_page

    page = (f'# TYPE {METRIC_LAYER_KEPT}_total counter\n{METRIC_LAYER_KEPT}_total{{layer="0"}} 120.0\n'
            f'{METRIC_LAYER_KEPT}_total{{layer="1"}} 40.0\n')
    assert parse_metrics_page(page) == {"layer_kept_0": 120.0, "layer_kept_1": 40.0}


def test_every_group_attends_over_its_own_exact_lengths_on_device_and_host():
    """With several groups, each group's metadata builds (eager and cudagraph capture) get its own
    lengths logical - E_g: on the device, group g > 0 in a persistent tensor written in place (a
    captured graph reads it at one address) and group 0 the runner's; on the host, the runner's
    upper bound (logical - min E) corrected to exact, with its max_seq_len (FlashInfer plans
    pages and last-page lengths from them). vLLM's reuse of group 0's metadata
    (`update_block_table`) is off for g > 0."""
    import numpy as np

    from madakv_vllm.vllm.runner import WorkerEviction

    worker = object.__new__(WorkerEviction)
    worker.num_groups = 2
    # E per request: group 0 [0, 5, 2, 0], group 1 [3, 5, 0, 0]; logical lengths [13, 25, 30, 0]
    worker.group_seq_lens = [None, torch.zeros(8, dtype=torch.int32)]
    worker.seq_len_offsets = [None, SimpleNamespace(gpu=torch.tensor([-3, 0, 2, 0, 0, 0, 0, 0], dtype=torch.int32))]
    worker.cpu_len_offsets = np.zeros((2, 8), dtype=np.int32)
    worker.cpu_len_offsets[:, :4] = [[0, 0, -2, 0], [-3, 0, 0, 0]]  # min E - E_g
    builders = [SimpleNamespace(supports_update_block_table=True) for _ in range(2)]
    groups = [SimpleNamespace(metadata_builders=[builder], build_metadata=lambda cm, *a, **k: cm,
                              build_metadata_for_cudagraph_capture=lambda cm, *a, **k: cm) for builder in builders]
    for g, group in enumerate(groups):
        worker._use_group_seq_lens(group, g)
    assert [builder.supports_update_block_table for builder in builders] == [True, False]
    runner_seq_lens = torch.tensor([13, 20, 28, 0], dtype=torch.int32)  # logical - E_0, on the device
    upper_bound = torch.tensor([13, 20, 30, 0], dtype=torch.int32)  # logical - min E, on the host
    common = SimpleNamespace(seq_lens=runner_seq_lens, seq_lens_cpu_upper_bound=upper_bound, num_reqs=4,
                             max_seq_len=30)
    exact = [[13, 20, 28, 0], [10, 20, 30, 0]]
    for g, group in enumerate(groups):
        for build, capture in ((group.build_metadata, False), (group.build_metadata_for_cudagraph_capture, True)):
            built = build(common, 0)
            assert built.seq_lens.tolist() == exact[g] and built.seq_lens_cpu_upper_bound.tolist() == exact[g]
            assert built.max_seq_len == (30 if capture else max(exact[g]))  # capture keeps vLLM's own
            if g > 0:
                assert built.seq_lens.data_ptr() == worker.group_seq_lens[1].data_ptr()
    assert common.seq_lens is runner_seq_lens and runner_seq_lens.tolist() == [13, 20, 28, 0]  # shared ones untouched
    assert upper_bound.tolist() == [13, 20, 30, 0] and common.max_seq_len == 30


def test_dummy_runs_see_no_offsets_of_the_last_real_step():
    """Dummy runs (data-parallel padding steps, cudagraph capture) build metadata without
    `_prepare_inputs`: the offsets of the last real step must not reach them."""
    import numpy as np

    from madakv_vllm.vllm.runner import WorkerEviction

    worker = object.__new__(WorkerEviction)
    worker.num_groups = 3
    worker.seq_len_offsets = [None] + [SimpleNamespace(np=np.array([4, -2], dtype=np.int32), copied=0)
                                       for _ in range(2)]
    for offsets in worker.seq_len_offsets[1:]:
        offsets.copy_to_gpu = lambda offsets=offsets: setattr(offsets, "copied", offsets.copied + 1)
    worker.cpu_len_offsets = np.array([[0, -1], [-3, 0], [-2, 0]], dtype=np.int32)
    seen = []
    dummy_run = worker._before(lambda *a, **k: seen.append(([o.np.tolist() for o in worker.seq_len_offsets[1:]],
                                                             worker.cpu_len_offsets.tolist())),
                               worker.clear_group_offsets)
    dummy_run(16, uniform_decode=True)
    assert seen == [([[0, 0], [0, 0]], [[0, 0], [0, 0], [0, 0]])]
    assert all(offsets.copied == 1 for offsets in worker.seq_len_offsets[1:])  # the device copies too


def test_a_plan_for_a_request_the_worker_does_not_evict_fails_loudly():
    """The scheduler has already swapped the request's blocks: a worker that skipped the plan would
    keep writing into the freed ones."""
    from madakv_vllm.vllm.protocol import CompactionPlan
    from madakv_vllm.vllm.runner import WorkerEviction

    worker = object.__new__(WorkerEviction)
    worker.requests = {}
    worker.runner = SimpleNamespace(requests={"known": object()})
    plan = CompactionPlan([[1, 2]], covered=100, kept=[30], computed=100)
    with pytest.raises(RuntimeError, match="does not evict"):
        worker.apply_plan("known", plan)
    with pytest.raises(RuntimeError, match="does not know"):
        worker.apply_plan("unknown", plan)


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts the calls that read a tensor's values back to the host (a device sync on a GPU)."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__, torch.Tensor.__float__,
             torch.Tensor.__bool__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.cpu}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func in self.READS
        return func(*args, **(kwargs or {}))


def test_compaction_bookkeeping_reads_the_device_once():
    """Kept/evicted per modality and HCC's layer demands are counted on the device and read back
    once per request, not once per layer and modality."""
    from madakv_vllm.policies import make_policy
    from madakv_vllm.vllm.runner import kept_and_evicted_by_modality

    gen = torch.Generator().manual_seed(0)
    tags = torch.zeros(300, dtype=torch.int8)
    tags[40:200] = 1
    keep = [torch.sort(torch.randperm(300, generator=gen)[:k].expand(4, -1), dim=1).values for k in (50, 90, 70)]
    with HostReads() as reads:
        counts = kept_and_evicted_by_modality(keep, tags)
    assert reads.count == 1
    kept_image = sum(int((tags[k] == 1).sum()) for k in keep) / 12
    assert (counts["kept_image"] == pytest.approx(kept_image)
            and counts["evicted_image"] == pytest.approx(160 - kept_image))
    assert counts["kept_text"] + counts["kept_image"] + counts.get("kept_video", 0) == pytest.approx(70)

    policy = make_policy("madakv", budget=0.2, window=8, layer_buckets=None)  # HCC: budgets follow the demands
    scores = torch.rand(6, 4, 300, generator=gen) ** 8
    scores[0] = 1.0  # spread attention: the highest demand
    with HostReads() as reads:
        budgets = policy.plan_budgets(scores, tags, 6)
    assert reads.count <= 2 and len(set(budgets)) > 1, (reads.count, budgets)


def test_counters_are_written_off_the_callers_path(monkeypatch, tmp_path):
    """publish() wakes a writer thread and returns: a slow disk never stalls a step."""
    import threading

    from madakv_vllm.vllm import metrics

    monkeypatch.setenv(metrics.ENV_DIR, str(tmp_path))
    counters = metrics.Counters("test")
    counters.add(requests=1)
    disk_free, write = threading.Event(), metrics.Counters.write

    def slow_write(self):
        disk_free.wait(timeout=30)
        write(self)

    monkeypatch.setattr(metrics.Counters, "write", slow_write)
    counters.publish()  # would hang here for 30 s if it wrote itself
    assert not list(tmp_path.glob("*.json"))
    counters.add(requests=2)
    counters.publish()
    disk_free.set()
    for _ in range(100):
        values, _ = metrics.read_totals(str(tmp_path))
        if values.get("requests") == 3:
            break
        threading.Event().wait(0.05)
    assert values.get("requests") == 3


def test_an_in_process_reader_gets_counters_that_no_writer_has_written_yet(monkeypatch, tmp_path):
    """madakv-eval's in-process engine reads right after a batch: the writer may not have run."""
    from madakv_vllm.vllm import metrics

    monkeypatch.setenv(metrics.ENV_DIR, str(tmp_path))
    counters = metrics.Counters("reader-test")
    counters.add(requests=2)  # changed, not published: the file is not there
    written = tmp_path / f"reader-test-{os.getpid()}-{counters.serial}.json"
    assert not written.exists()
    metrics.write_all_in_this_process()  # (other live counters of this test process write theirs too)
    assert json.loads(written.read_text())["values"] == {"requests": 2}


def test_two_engines_in_one_process_keep_their_counters_apart(monkeypatch, tmp_path):
    """A second in-process engine (or one a test left alive) has its own folder and files: writing
    every counter of the process must not put the first engine's totals into the second's."""
    from madakv_vllm.vllm import metrics

    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir(), second_dir.mkdir()
    monkeypatch.setenv(metrics.ENV_DIR, str(first_dir))
    first = metrics.Counters("scheduler")
    first.add(requests=5)
    monkeypatch.setenv(metrics.ENV_DIR, str(second_dir))
    second, second_worker = metrics.Counters("scheduler"), metrics.Counters("scheduler")
    second.add(requests=1)
    second_worker.add(requests=2)  # same name, same folder, same process: summed, not overwritten
    metrics.write_all_in_this_process()
    assert metrics.read_totals(str(first_dir))[0] == {"requests": 5}
    assert metrics.read_totals(str(second_dir))[0] == {"requests": 3}


def test_during_prefill_flag_xargs_and_target():
    config = plugin.config_from_args(parse("--kv-eviction", "madakv", "--kv-eviction-during-prefill"))
    assert config.build_policy().during_prefill is True
    assert plugin.config_from_args(parse("--kv-eviction", "madakv")).build_policy().during_prefill is False
    base = EvictionConfig(policy="madakv", budget=0.2, window=8)
    assert request_policy(base, {"kv_eviction_during_prefill": True}).during_prefill is True
    # JSON bodies: vLLM's vllm_xargs keeps strings and numbers, so true arrives as 1
    for on, off in ((1, 0), ("true", "False")):
        assert request_policy(base, {"kv_eviction_during_prefill": on}).during_prefill is True
        assert request_policy(base, {"kv_eviction_during_prefill": off}).during_prefill is False
    for bad in ("yes", 2, 0.5):
        with pytest.raises(EvictionConfigError, match="bad vllm_xargs.*during_prefill"):
            request_config(base, {"kv_eviction_during_prefill": bad})
    from madakv_vllm.vllm.requests import engine_config

    with pytest.raises(EvictionConfigError, match="HF reference path only"):  # what vLLM does not run
        engine_config({"kv_eviction": {"policy": "madakv", "during_prefill": True, "prefill_scores": "running"}})
    chunk_scored = {"kv_eviction_during_prefill": True, "kv_eviction_prefill_scores": "chunk"}
    target = eviction_target(request_policy(base, chunk_scored), 1000, chunk=64)
    assert (target.kept, target.limit, target.probe) == (200, 300, 0)  # slack 0.5 of the kept count
    assert target.compacts_after_chunk(512, 301) and not target.compacts_after_chunk(512, 300)
    assert not target.compacts_after_chunk(500, 400)  # only at multiples of the chunk: fixed points
    assert not target.compacts_after_chunk(993, 400)  # inside the proxy window: the prompt's own compaction
    assert target.next_compaction_point(500) == 512 and target.next_compaction_point(512) == 576
    assert target.next_compaction_point(960) is None  # 1024 is past the window's start (992)
    assert eviction_target(request_policy(base, None), 1000, chunk=64).limit is None
    # the default scores early chunks with the question's window run after them: the probe shares the
    # chunk's step (points every 64 - 8 tokens), and runs where its rows and the window hold no image
    target = eviction_target(request_policy(base, {"kv_eviction_during_prefill": True}), 1000, chunk=64)
    assert (target.chunk, target.probe) == (56, 8)
    assert target.next_compaction_point(500) == 504 and target.next_compaction_point(952) is None
    image = SimpleNamespace(mm_position=SimpleNamespace(offset=500, length=20, is_embed=None))
    assert target.probes_at(504, []) and target.probes_at(504, [image])  # the probe's rows run as text
    at_the_end = SimpleNamespace(mm_position=SimpleNamespace(offset=990, length=6, is_embed=None))
    assert not target.probes_at(504, [at_the_end])  # the window itself holds the image
    separator = SimpleNamespace(mm_position=SimpleNamespace(offset=988, length=6, is_embed=torch.arange(6) < 4))
    assert target.probes_at(504, [separator])  # 992-993 are in its range but take no embeddings
    assert not eviction_target(request_policy(base, {"kv_eviction_during_prefill": True}), 1000,
                               chunk=64).probes_at(992, [])  # its rows would reach the prompt's end


def test_peak_blocks_count_what_a_request_holds_at_once():
    from madakv_vllm.policies import make_policy
    from madakv_vllm.vllm.requests import peak_blocks

    during = make_policy("madakv", budget=0.05, window=8, during_prefill=True, prefill_slack=0.25)
    # kept 150 of 3000, limit 188: a chunk of 64 on top (8 blocks of 32) while the copy of the
    # kept tokens and the next chunk take 7 more; the kept prompt + output is far less
    assert peak_blocks(during, 3000, 10, 64, 32) == 8 + 7
    assert peak_blocks(during, 3000, 2000, 64, 32) == -(-(150 + 2000) // 32)  # the output is not evicted
    assert peak_blocks(during, 60, 10, 64, 32) == -(-70 // 32)  # never more than the whole request
    one_shot = make_policy("madakv", budget=0.05, window=8)
    assert peak_blocks(one_shot, 3000, 10, 64, 32) == peak_blocks(None, 3000, 10, 64, 32) == -(-3010 // 32)
    # scores too large for the limit: no eviction, the whole request
    assert peak_blocks(during, 3000, 10, 64, 32, scores_per_token=100, score_bytes_limit=1000) == -(-3010 // 32)


def test_decode_budget_flag_xargs_and_target():
    config = plugin.config_from_args(parse("--kv-eviction", "madakv", "--kv-eviction-decode-budget", "256"))
    assert config.build_policy().decode_budget == 256
    assert plugin.config_from_args(parse("--kv-eviction", "madakv", "--kv-eviction-decode-budget", "0.1")) \
        .build_policy().decode_budget == 0.1
    with pytest.raises(EvictionConfigError, match="decode_budget"):
        plugin.config_from_args(parse("--kv-eviction", "madakv", "--kv-eviction-decode-budget", "lots"))
    base = EvictionConfig(policy="madakv", budget=0.2, window=8)
    assert base.build_policy().decode_budget is None
    assert request_policy(base, {"kv_eviction_decode_budget": 128}).decode_budget == 128
    assert request_policy(base, {"kv_eviction_decode_budget": "0.5"}).decode_budget == 0.5
    for bad in (0, -1, 2.5, "x"):
        with pytest.raises(EvictionConfigError, match="bad vllm_xargs.*decode_budget"):
            request_config(base, {"kv_eviction_decode_budget": bad})
    target = eviction_target(request_policy(base, {"kv_eviction_decode_budget": 100}), 1000)
    assert (target.kept, target.decode_cap, target.decode_slack, target.decode_interval) == (200, 100, 25, 25)
    # the prompt keeps 200 > cap + slack: compacted as soon as 8 output tokens scored it, then every 25
    first = target.first_decode_point(max_kept=200, since=1000)
    assert first == 1008 and target.decode_point_after(first, 1000) == 1008
    assert target.decode_point_after(first, 1008) == 1033 and target.decode_point_after(first, 1032) == 1033
    assert target.decode_point_due(first, 1008, covered=1000) == 1008
    assert target.decode_point_due(first, 1007, covered=1000) is None  # its window is not done
    assert target.decode_point_due(first, 1008, covered=1008) is None  # done already
    assert target.decode_point_due(first, 1020, covered=1000) == 1008  # late, its scores still whole
    assert target.decode_point_due(first, 1026, covered=1000) is None  # the next window replaced them
    # the budget covers the prompt: only the output is evicted, from the prompt's length on
    whole = eviction_target(request_policy(base, {"kv_eviction_budget": 1.0, "kv_eviction_decode_budget": 64}), 300)
    assert whole is not None and not whole.prompt_evicted and whole.first_scored_query() == 300
    assert whole.first_decode_point(300, 300) == 308
    assert eviction_target(request_policy(base, {"kv_eviction_budget": 1.0}), 300) is None


def test_peak_blocks_with_eviction_during_decode():
    from madakv_vllm.policies import make_policy
    from madakv_vllm.vllm.requests import peak_blocks

    capped = make_policy("madakv", budget=0.05, window=8, during_prefill=True, prefill_slack=0.25, decode_budget=128)
    # the prompt's phase as without the cap (15 blocks); the output's: the cap + one interval
    # (32) + 2 carried (6 blocks) while the kept ones are copied (5 blocks): the prompt's dominates
    assert peak_blocks(capped, 3000, 2000, 64, 32) == 15
    assert peak_blocks(make_policy("madakv", budget=0.05, window=8, decode_budget=128), 3000, 2000, 64, 32) == \
        -(-3001 // 32) + -(-151 // 32)  # the whole prompt, and its kept copy
