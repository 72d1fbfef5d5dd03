# Package layout only (metadata lives in pyproject.toml). `madakv_kernels` is its own top-level
# package (folder name == import name) so it can be used without this plugin or vLLM. The YAML
# presets in configs/ ship inside the wheel as madakv_vllm/presets/, so `--kv-eviction-config
# madakv-20` works from any install.
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["madakv_vllm", "madakv_vllm.*", "madakv_kernels"]) + ["madakv_vllm.presets"],
    package_dir={"madakv_vllm.presets": "configs"},
    package_data={"madakv_vllm.presets": ["*.yaml"]},
)
