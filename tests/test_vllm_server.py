"""The real `vllm serve` command with --kv-eviction: chat with images, per-request overrides,
a bad override (HTTP 400, server keeps serving), Prometheus counters, and start-up refusals."""
import base64
import contextlib
import io
import json
import os
import random
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from madakv_vllm.http_client import free_port, kv_cache_usage, post_json
from prompts import images, milebench_task, random_xargs

pytestmark = pytest.mark.slow  # starts vLLM engines or servers (minutes); `-m "not slow"` skips them

VLLM = Path(sys.executable).with_name("vllm")


def server_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_ENABLE_V1_MULTIPROCESSING", "TRITON_INTERPRET")}
    env.update(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1")
    return env


def serve_command(model_dir, port, *extra) -> list[str]:
    return [str(VLLM), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", "tiny", "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
            "--block-size", "32", "--max-num-seqs", "4", "--limit-mm-per-prompt", '{"image": 2}', *extra]


@contextlib.contextmanager
def running_server(model_dir, log: Path, *flags):
    """`vllm serve` on a free port with these flags; yields its base URL, stops it after."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen(serve_command(model_dir, port, *flags), stdout=out, stderr=subprocess.STDOUT,
                                env=server_env())
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            urllib.request.urlopen(base + "/v1/models", timeout=5)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"vllm serve did not start:\n{log.read_text()[-3000:]}")
            time.sleep(2)
    try:
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with running_server(tiny_model_dir("qwen2vl"), tmp_path_factory.mktemp("server") / "server.log", "--kv-eviction",
                        "madakv", "--kv-eviction-budget", "0.3", "--kv-eviction-window", "8") as base:
        yield base


def image_url(img) -> str:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat(client, **extra_body):
    content = []
    for i, img in enumerate(images(2)):
        content += [{"type": "image_url", "image_url": {"url": image_url(img)}},
                    {"type": "text", "text": f"picture {i} shows a cat on the left " * 6}]
    content.append({"type": "text", "text": "which picture is green?"})
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                          max_tokens=8, temperature=0, extra_body={"ignore_eos": True, **extra_body})


def metric(base: str, key: str) -> float:
    """One of our counters from the server's /metrics, by short key (metrics.parse_metrics_page)."""
    from madakv_vllm.vllm.metrics import parse_metrics_page

    return parse_metrics_page(urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()).get(key, 0.0)


def test_chat_with_images_overrides_and_metrics(server):
    import openai

    client = openai.OpenAI(base_url=server + "/v1", api_key="EMPTY")
    before = {key: metric(server, key) for key in ("requests", "blocks_freed")}
    evicted = chat(client)
    assert evicted.usage.completion_tokens == 8 and evicted.usage.prompt_tokens > 100
    stock = chat(client, vllm_xargs={"kv_eviction": "none"})
    smaller = chat(client, vllm_xargs={"kv_eviction_budget": 0.1})
    assert stock.usage.completion_tokens == smaller.usage.completion_tokens == 8
    with pytest.raises(openai.BadRequestError, match="kv_eviction_budget|budget"):
        chat(client, vllm_xargs={"kv_eviction_budget": 5.5})
    with pytest.raises(openai.BadRequestError, match="unknown eviction policy"):
        chat(client, vllm_xargs={"kv_eviction": "fastkv"})
    assert chat(client).choices[0].message.content == evicted.choices[0].message.content  # still serving
    deadline = time.time() + 30
    while metric(server, "requests") < before["requests"] + 3:
        assert time.time() < deadline, "eviction counters did not move"
        time.sleep(1)
    assert metric(server, "blocks_freed") > before["blocks_freed"]
    assert metric(server, "kept_image") > 0
    assert metric(server, "evicted_text") > 0
    assert metric(server, "seconds_count") >= 3


@pytest.mark.parametrize("flags, message", [
    (["--kv-eviction", "fastkv"], "invalid choice"),
    (["--kv-eviction", "madakv", "--kv-eviction-budget", "1.5"], "ratio must be in"),
    (["--kv-eviction", "madakv", "--kv-eviction-budget", "8"], "smaller than the budget"),  # window 8
    (["--kv-eviction-config", "missing.yaml"], "neither a file nor a preset"),
])
def test_bad_flags_fail_with_one_line(tiny_model_dir, flags, message):
    result = subprocess.run(serve_command(tiny_model_dir("qwen2vl"), free_port(), *flags), env=server_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert any(re.search(message, line) for line in errors), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def run_demo(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "madakv_vllm.demo", *args], env=server_env(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    freed = re.search(r"KV blocks freed\s+(\d+)", result.stdout)
    assert freed and int(freed.group(1)) > 0, result.stdout
    kept = re.search(r"tokens kept\s+text (\d+), image (\d+)", result.stdout)
    assert kept and int(kept.group(1)) > 0
    assert "server stopped" in result.stdout
    return result.stdout


def test_readme_demo_command_answers_from_a_picture():
    """`bash scripts/demo.sh` minus the install step: serve the judge, ask for the word in one of
    the pictures, print what eviction did and, last, that the reply was right."""
    out = run_demo()
    expected = re.search(r'its answer, "(\w+)", is only in one of the 4 pictures', out).group(1)
    reply = out.split("generated):\n", 1)[1].split("\n", 1)[0]
    assert expected in reply.lower() and re.search(r"tokens kept\s+text \d+, image [1-9]", out)
    assert out.rstrip().splitlines()[-2:] == [f"expected: {expected}", "correct: yes"]
    # a text-first policy evicts the pictures, and the answer with them
    assert run_demo("--policy", "lookm").rstrip().splitlines()[-1] == "correct: no"


def test_demo_tiny_model_still_runs():
    assert run_demo("--tiny").rstrip().splitlines()[-1].startswith("correct: ")


def test_madakv_eval_measures_memory_from_the_server(server, tmp_path):
    """madakv-eval against the real server: scores, and the KV share each setting kept, read
    from the server's /metrics around the setting."""
    import csv

    from madakv_vllm.evaluation import cli

    data = milebench_task(tmp_path / "data")
    assert cli.main(["--data", str(data), "--endpoint", server + "/v1", "--policies", "none", "madakv",
                     "--budgets", "0.2", "--max-tokens", "4", "--out", str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "summary.csv") as f:
        rows = {(r["policy"], r["budget"]): r for r in csv.DictReader(f) if r["task"] == "ALL"}
    assert float(rows[("none", "")]["kv_kept"]) == 1.0 and int(rows[("none", "")]["evicted_requests"]) == 0
    evicted = rows[("madakv", "0.2")]
    assert int(evicted["evicted_requests"]) == 2 and float(evicted["blocks_freed"]) > 0
    assert float(evicted["kv_kept"]) == pytest.approx(0.2, abs=0.01)


def fuzz_body(rng: random.Random) -> tuple[str, dict]:
    """A random request: token-id completions of 1 token to past max_model_len, or chats with
    0-8 images (the server allows 2), text-only or images-only, max_tokens 1-8, random vllm_xargs."""
    xargs = random_xargs(rng)
    max_tokens = rng.choice([1, 1, rng.randint(1, 8)])
    if rng.random() < 0.5:
        length = rng.choice([1, 2, 3, rng.randint(4, 200), rng.randint(200, 2100)])
        prompt = [rng.randrange(20, 400) for _ in range(length)]
        return "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                   "vllm_xargs": xargs}
    num_images = rng.choice([0, 0, 1, 2, 2, rng.randint(3, 8)])
    content = [{"type": "image_url", "image_url": {"url": image_url(img)}} for img in images(num_images)]
    if not content or rng.random() < 0.7:
        content.append({"type": "text", "text": "the dog sits by the river " * rng.randint(1, 60)})
    return "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": content}],
                                    "max_tokens": max_tokens, "temperature": 0, "vllm_xargs": xargs}


def test_fuzzed_requests_get_200_or_400_and_leave_nothing_behind(server):
    """Arbitrary vllm_xargs and prompt shapes: every answer is 200 or 400, the server keeps
    serving, and once idle the KV cache is empty again (no leaked blocks)."""
    from concurrent.futures import ThreadPoolExecutor

    rng = random.Random(1)
    bodies = [fuzz_body(rng) for _ in range(48)]
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda pb: post_json(server, *pb), bodies))
    unexpected = [(s, b) for s, (_, b) in zip(statuses, bodies) if s not in (200, 400)]
    assert not unexpected, unexpected[:3]
    assert statuses.count(200) >= 10 and statuses.count(400) >= 5, statuses
    assert post_json(server, "/v1/completions", {"model": "tiny", "prompt": [30, 40], "max_tokens": 2,
                                            "vllm_xargs": {"kv_eviction_window": 0, "kv_eviction_budget": 0.2}}) == 200
    deadline = time.time() + 60
    while (usage := kv_cache_usage(server)) > 0:
        assert time.time() < deadline, f"KV cache usage stays at {usage} when idle"
        time.sleep(1)


def test_a_prompt_four_times_the_kv_pool_through_vllm_serve(tiny_model_dir, tmp_path):
    """`vllm serve --kv-eviction-during-prefill` with a pool of 736 tokens and --max-model-len 3072
    (stock vLLM refuses to start so): a 3000-token prompt is answered; the same prompt without the
    mode is an HTTP 400 that says why, and the server goes on."""
    flags = ["--kv-eviction", "madakv", "--kv-eviction-budget", "0.05", "--kv-eviction-during-prefill",
             "--num-gpu-blocks-override", "24", "--max-model-len", "3072", "--max-num-batched-tokens", "64"]
    prompt = [random.Random(3).randrange(20, 400) for _ in range(3000)]

    def complete(base, **extra):
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True, **extra}
        request = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    with running_server(tiny_model_dir("qwen2vl"), tmp_path / "server.log", *flags) as base:
        status, reply = complete(base)
        assert status == 200 and reply["usage"]["prompt_tokens"] == 3000, reply
        status, reply = complete(base, vllm_xargs={"kv_eviction_during_prefill": False})
        assert status == 400 and "more than the 23 the KV cache has" in reply["error"]["message"], reply
        status, reply = complete(base)
        assert status == 200, reply
