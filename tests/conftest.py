import os

import torch  # noqa: E402

# Read when @triton.jit decorates, so before any kernel module is imported. With a GPU the kernels
# run natively (scripts/device_check.sh, scripts/gpu_check.sh); without one, interpreted on CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# vLLM on CPU, in-process (engine core in this process): 1 GiB of KV cache per engine.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Build (once per session) and return the directory of a tiny random model by arch name
    (and decoder layer count)."""
    from madakv_vllm.testing.models import build

    built = {}

    def get(arch: str, num_layers: int = 2):
        if (arch, num_layers) not in built:
            built[arch, num_layers] = build(arch, tmp_path_factory.mktemp(f"{arch}-{num_layers}"),
                                            num_layers=num_layers)
        return built[arch, num_layers]

    return get


@pytest.fixture(scope="session")
def hf_model(tiny_model_dir):
    """(model, processor) of a tiny model in fp32 with sdpa attention, loaded once per session."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    loaded = {}

    def get(arch: str, num_layers: int = 2):
        if (arch, num_layers) not in loaded:
            path = tiny_model_dir(arch, num_layers)
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
            loaded[arch, num_layers] = (model.eval(), AutoProcessor.from_pretrained(path))
        return loaded[arch, num_layers]

    return get
