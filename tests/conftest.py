import os

# Read when @triton.jit decorates, so before any kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Build (once per session) and return the directory of a tiny random model by arch name."""
    from madakv_vllm.testing.models import build

    built = {}

    def get(arch: str):
        if arch not in built:
            built[arch] = build(arch, tmp_path_factory.mktemp(arch))
        return built[arch]

    return get
