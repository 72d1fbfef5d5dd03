# Package layout only (metadata lives in pyproject.toml). `madakv_kernels` is its own top-level
# package (folder name == import name) so it can be used without this plugin or vLLM.
from setuptools import find_packages, setup

setup(packages=find_packages(include=["madakv_vllm", "madakv_vllm.*", "madakv_kernels"]))
