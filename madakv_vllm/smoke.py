"""Serving smoke test: `vllm serve --kv-eviction madakv` on a locally built tiny model, under a
stream of concurrent chats and completions for a fixed time, then one verdict line.

    python -m madakv_vllm.smoke                 # about 2 minutes
    python -m madakv_vllm.smoke --seconds 20

On a CUDA machine the server runs with vLLM's defaults (cudagraphs FULL_AND_PIECEWISE, async
scheduling), so it exercises the CUDA path end to end; on CPU it runs eagerly in fp32. Passes
when every request answered 200, requests were evicted and blocks freed, and the KV cache is
empty again once idle. scripts/gpu_check.sh runs it after the test suite.
"""
from __future__ import annotations

import argparse
import base64
import io
import os
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .http_client import eviction_metrics, free_port, kv_cache_usage, post_json, stop_server, wait_ready
from .vllm.requests import XARG_BUDGET, XARG_POLICY


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=120, help="how long to send requests")
    p.add_argument("--concurrency", type=int, default=8)
    return p.parse_args(argv)


def chat_content(num_images: int) -> list:
    """A short chat: `num_images` plain-colour pictures, each with a sentence, then a question."""
    from PIL import Image

    content = []
    for i in range(num_images):
        buffer = io.BytesIO()
        Image.new("RGB", (112, 112), ("red", "green", "blue")[i % 3]).save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        content += [{"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": f"Picture {i + 1} was taken near the river at dawn. " * 8}]
    content.append({"type": "text", "text": "Which picture is green, and what do the pictures have in common?"})
    return content


def random_body(rng: random.Random) -> tuple[str, dict]:
    xargs = rng.choice([{}, {XARG_BUDGET: 0.1}, {XARG_POLICY: "snapkv"}, {XARG_POLICY: "none"}])
    if rng.random() < 0.5:
        prompt = [rng.randrange(20, 400) for _ in range(rng.randint(50, 1500))]
        return "/v1/completions", {"model": "smoke", "prompt": prompt, "max_tokens": rng.randint(1, 32),
                                   "temperature": 0, "ignore_eos": True, "vllm_xargs": xargs}
    content = chat_content(rng.randint(0, 2))
    return "/v1/chat/completions", {"model": "smoke", "messages": [{"role": "user", "content": content}],
                                    "max_tokens": rng.randint(1, 32), "temperature": 0, "vllm_xargs": xargs}


def main(argv=None) -> int:
    import torch

    from .testing.models import build

    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    model = Path(tempfile.mkdtemp(prefix="madakv-smoke-")) / "model"
    build("qwen2vl", model)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [str(Path(sys.executable).with_name("vllm")), "serve", str(model), "--host", "127.0.0.1",
               "--port", str(port), "--served-model-name", "smoke", "--max-model-len", "2048",
               "--limit-mm-per-prompt", '{"image": 2}', "--kv-eviction", "madakv", "--kv-eviction-budget", "0.2"]
    command += ["--dtype", "bfloat16"] if cuda else ["--dtype", "float32", "--enforce-eager", "--block-size", "32"]
    log = model.parent / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(base, proc, log)
        rng, statuses, deadline = random.Random(0), [], time.time() + args.seconds
        with ThreadPoolExecutor(args.concurrency) as pool:
            while time.time() < deadline:
                bodies = [random_body(rng) for _ in range(args.concurrency)]
                statuses += list(pool.map(lambda body: post_json(base, *body), bodies))
        time.sleep(2)  # counters reach /metrics on the next stats tick
        counters = eviction_metrics(base)
        usage_deadline = time.time() + 60
        while (usage := kv_cache_usage(base)) > 0 and time.time() < usage_deadline:
            time.sleep(1)
    finally:
        stop_server(proc)
    failures = [s for s in statuses if s != 200]
    ok = statuses and not failures and counters.get("requests", 0) > 0 and counters.get("blocks_freed", 0) > 0 \
        and usage == 0
    print(f"smoke: {'PASS' if ok else 'FAIL'} ({'CUDA, default cudagraphs' if cuda else 'CPU, eager'}; "
          f"{len(statuses)} requests, {len(failures)} not 200; {counters.get('requests', 0):.0f} evicted, "
          f"{counters.get('blocks_freed', 0):.0f} blocks freed; KV usage when idle {usage:.3f}; log {log})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
