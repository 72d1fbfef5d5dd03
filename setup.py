# Package layout only (metadata lives in pyproject.toml): the folder `kernels/` installs as the
# package `madakv_kernels`, so it can be used without this plugin or vLLM.
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["madakv_vllm", "madakv_vllm.*"]) + ["madakv_kernels"],
    package_dir={"madakv_kernels": "kernels"},
)
