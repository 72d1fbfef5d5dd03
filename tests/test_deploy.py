"""deploy/: the Dockerfile, the Kubernetes manifests and the Helm values, validated as far as a
machine without Docker or a cluster can: lint, Kubernetes schemas, and vLLM's own `vllm serve`
parser reading the exact arguments each one passes (so a typo in a flag fails here)."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def serve_args(argv: list[str], local_model):
    """`vllm serve ARGV` parsed by vLLM's own serve parser (with this plugin's flags). The model
    (ARGV[0]) is swapped for a local one: the tests run with the hub offline."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from madakv_vllm.vllm import plugin

    plugin.register()
    root = FlexibleArgumentParser()
    ServeSubcommand().subparser_init(root.add_subparsers())
    assert not argv[0].startswith("-")
    args = root.parse_args(["serve", str(local_model), *argv[1:]])
    args.model = args.model_tag
    return args, EngineArgs.from_cli_args(args)


def test_dockerfile_builds_on_the_supported_vllm_image_and_lints_clean():
    from madakv_vllm.vllm.compat import SUPPORTED_VLLM

    text = (DEPLOY / "Dockerfile").read_text()
    assert re.findall(r"^FROM (\S+)", text, re.M) == [f"vllm/vllm-openai:v{SUPPORTED_VLLM}"]
    assert not re.search(r"^(ENTRYPOINT|CMD)\b", text, re.M), "the image keeps vLLM's own entrypoint"
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    result = subprocess.run([hadolint, str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_manifests_pass_the_api_schemas_and_vllm_parses_their_args(tiny_model_dir):
    validate = str(Path(sys.executable).with_name("kubernetes-validate"))
    manifests = sorted(str(p) for p in (DEPLOY / "k8s").glob("*.yaml"))
    result = subprocess.run([validate, "--strict", "-k", "1.32.0", *manifests], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    deployment = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args, engine_args = serve_args(container["args"], tiny_model_dir("qwen2vl"))
    assert engine_args.additional_config["kv_eviction"]["policy"] == "madakv"
    assert engine_args.additional_config["kv_eviction"]["budget"] == 0.2
    assert args.port == container["ports"][0]["containerPort"] == 8000
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("spec_index", [0])
def test_helm_values_give_vllm_a_command_line_it_accepts(spec_index, tiny_model_dir):
    """The production-stack chart runs `vllm serve <modelURL> --host 0.0.0.0 --port 8000
    <flags from vllmConfig> <extraArgs>`; rebuild that line from our values and parse it."""
    values = yaml.safe_load((DEPLOY / "helm" / "values.yaml").read_text())
    spec = values["servingEngineSpec"]["modelSpec"][spec_index]
    config = spec["vllmConfig"]
    argv = [spec["modelURL"], "--host", "0.0.0.0", "--port", "8000",
            "--enable-chunked-prefill" if config["enableChunkedPrefill"] else "--no-enable-chunked-prefill",
            "--enable-prefix-caching" if config["enablePrefixCaching"] else "--no-enable-prefix-caching",
            "--max-model-len", str(config["maxModelLen"]), "--dtype", config["dtype"],
            "--tensor-parallel-size", str(config["tensorParallelSize"]), "--max-num-seqs", str(config["maxNumSeqs"]),
            "--gpu_memory_utilization", str(config["gpuMemoryUtilization"]), *config["extraArgs"]]
    _, engine_args = serve_args(argv, tiny_model_dir("qwen2vl"))
    assert engine_args.additional_config["kv_eviction"]["policy"] == "madakv"
    assert engine_args.enable_prefix_caching and engine_args.max_model_len == 32768
    assert spec["tag"].endswith("vllm0.32.0") and spec["podAnnotations"]["prometheus.io/path"] == "/metrics"
    probes = values["servingEngineSpec"]
    assert all(probes[p]["httpGet"]["path"] == "/health" for p in ("startupProbe", "readinessProbe", "livenessProbe"))
