"""deploy/: the Dockerfile, the Kubernetes manifests and the Helm values, validated as far as a
machine without Docker or a cluster can: lint, Kubernetes schemas, and vLLM's own `vllm serve`
parser reading the exact arguments each one passes (so a typo in a flag fails here)."""
import os
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


# --- closed by default: API key from a Secret, every path guarded, no dev mode, least privilege ---

MIDDLEWARE = "require_api_key.RequireApiKey"


def deployment_pod():
    return yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())["spec"]["template"]["spec"]


def helm_values():
    return yaml.safe_load((DEPLOY / "helm" / "values.yaml").read_text())


def middleware_module(monkeypatch, key: str):
    """deploy/require_api_key.py imported afresh with VLLM_API_KEY = key (it reads it on import)."""
    monkeypatch.setenv("VLLM_API_KEY", key)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # no __pycache__ left in deploy/
    monkeypatch.syspath_prepend(str(DEPLOY))
    monkeypatch.delitem(sys.modules, "require_api_key", raising=False)
    import require_api_key

    return require_api_key


def test_deployment_reads_the_api_key_from_a_required_secret_and_enforces_it():
    (container,) = deployment_pod()["containers"]
    env = {e["name"]: e for e in container["env"]}
    ref = env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"] and "value" not in env["VLLM_API_KEY"]
    assert ref.get("optional") is False  # said explicitly: a missing Secret stops the pod
    args = container["args"]
    assert "--api-key" not in args, "a key in args is visible in the pod spec and in ps"
    assert args[args.index("--middleware") + 1] == MIDDLEWARE


def test_helm_values_read_the_api_key_from_an_existing_secret():
    values = helm_values()
    key = values["servingEngineSpec"]["vllmApiKey"]
    # the chart turns a string into a generated Secret: the key would live in this file
    assert isinstance(key, dict) and key["secretName"] and key["secretKey"]
    extra = values["servingEngineSpec"]["modelSpec"][0]["vllmConfig"]["extraArgs"]
    assert extra[extra.index("--middleware") + 1] == MIDDLEWARE and "--api-key" not in extra


def test_the_image_installs_the_middleware_that_the_manifests_name():
    text = (DEPLOY / "Dockerfile").read_text()
    module = MIDDLEWARE.split(".")[0]
    assert (DEPLOY / f"{module}.py").is_file()
    assert f"deploy/{module}.py" in text and re.search(rf"python3 -c \"import [^\"]*\b{module}\b", text)


def test_no_manifest_turns_on_vllm_dev_mode():
    """VLLM_SERVER_DEV_MODE serves /reset_prefix_cache, /sleep, /collective_rpc ... unauthenticated."""
    files = [p for p in DEPLOY.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert len(files) >= 5
    assert not [p for p in files if b"VLLM_SERVER_DEV_MODE" in p.read_bytes()]


def test_containers_drop_privileges_and_claim_non_root_only_where_the_image_is():
    image_user = re.findall(r"^USER\s+(\S+)", (DEPLOY / "Dockerfile").read_text(), re.M)
    image_non_root = bool(image_user) and image_user[-1].split(":")[0] not in ("root", "0")
    pod = deployment_pod()
    (container,) = pod["containers"]
    values = helm_values()
    contexts = [(pod["securityContext"], container["securityContext"])]
    contexts += [(values[spec]["securityContext"], values[spec]["containerSecurityContext"])
                 for spec in ("servingEngineSpec", "routerSpec")]
    for pod_context, container_context in contexts:
        assert container_context["allowPrivilegeEscalation"] is False
        assert container_context["capabilities"] == {"drop": ["ALL"]}
        assert pod_context["seccompProfile"] == {"type": "RuntimeDefault"}
        for context in (pod_context, container_context):
            # runAsNonRoot on an image that runs as root: the kubelet refuses to start it
            assert not context.get("runAsNonRoot") or image_non_root
    assert pod["automountServiceAccountToken"] is False


def test_middleware_guards_every_vllm_route_but_health_and_metrics(tiny_model_dir, monkeypatch):
    """vLLM's app built from the Deployment's own args: without the key every route is a 401,
    except the probes' /health and the scrape's /metrics; with it, requests reach vLLM."""
    from fastapi.routing import APIRoute
    from starlette.routing import Route
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect
    from vllm.entrypoints.launchers.app import build_app

    module = middleware_module(monkeypatch, "s3cret")
    (container,) = deployment_pod()["containers"]
    args, _ = serve_args(container["args"], tiny_model_dir("qwen2vl"))
    assert args.middleware == [MIDDLEWARE]
    app = build_app(args, ("generate",))
    client = TestClient(app, raise_server_exceptions=False)

    routes = [(r.path, m) for r in app.routes if isinstance(r, (APIRoute, Route)) for m in sorted(r.methods)]
    paths = {p for p, _ in routes}
    assert {"/invocations", "/generative_scoring", "/tokenize", "/v1/chat/completions"} <= paths
    assert module.OPEN_PATHS == {"/health", "/metrics"} and module.OPEN_PATHS <= paths
    for path, method in routes:
        url = re.sub(r"\{[^}]+\}", "x", path)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            status = client.request(method, url, headers=headers).status_code
            assert (status == 401) == (path not in module.OPEN_PATHS), (method, path, headers, status)
        if path not in module.OPEN_PATHS:
            assert client.request(method, url, headers={"Authorization": "Bearer s3cret"}).status_code != 401
    assert client.get("/metrics").status_code == 200
    with pytest.raises(WebSocketDisconnect) as closed, client.websocket_connect("/v1/realtime"):
        pass
    assert closed.value.code == 1008  # policy violation, before vLLM sees the socket
    probes = [container[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")]
    deployment = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    scraped = deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]
    assert set(probes) | {scraped} <= module.OPEN_PATHS


def test_vllm_own_api_key_leaves_invocations_open(tiny_model_dir, monkeypatch):
    """Why the middleware: vLLM 0.32's --api-key alone lets /invocations (chat and completions
    for SageMaker) through without a key."""
    from starlette.testclient import TestClient
    from vllm.entrypoints.launchers.app import build_app

    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    args, _ = serve_args(["m", "--api-key", "s3cret"], tiny_model_dir("qwen2vl"))
    client = TestClient(build_app(args, ("generate",)), raise_server_exceptions=False)
    assert client.post("/v1/completions", json={}).status_code == 401
    assert client.post("/invocations", json={}).status_code != 401


@pytest.mark.parametrize("key", [None, "", "  "])
def test_middleware_refuses_to_load_without_a_key(key):
    env = {k: v for k, v in os.environ.items() if k != "VLLM_API_KEY"}
    if key is not None:
        env["VLLM_API_KEY"] = key
    result = subprocess.run([sys.executable, "-B", "-c", "import require_api_key"], cwd=DEPLOY, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "refusing to serve without an API key" in result.stderr
    env["VLLM_API_KEY"] = "k"
    assert subprocess.run([sys.executable, "-B", "-c", "import require_api_key"], cwd=DEPLOY, env=env,
                          timeout=60).returncode == 0


def test_network_policy_admits_only_the_namespace_and_prometheus_to_every_serving_pod():
    policy = yaml.safe_load((DEPLOY / "k8s" / "networkpolicy.yaml").read_text())
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    values = helm_values()
    pod_labels = [yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())["spec"]["template"]["metadata"]
                  ["labels"], values["servingEngineSpec"]["labels"], values["routerSpec"]["labels"]]
    for labels in pod_labels:  # the Deployment's pod, the chart's engines and its router
        assert selector.items() <= labels.items()
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8000}]
    same_namespace, prometheus = rule["from"]
    assert same_namespace == {"podSelector": {}}  # no namespaceSelector: this namespace only
    assert list(prometheus) == ["namespaceSelector"] and prometheus["namespaceSelector"]["matchLabels"]


def test_service_stays_inside_the_cluster():
    service = yaml.safe_load((DEPLOY / "k8s" / "service.yaml").read_text())
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
