"""The main demo: serve a model with `vllm serve --kv-eviction`, send a multi-image chat through
the OpenAI client, and show what eviction did (from the server's /metrics).

    bash scripts/demo.sh                      # installs what is missing, then runs this
    python -m madakv_vllm.demo --policy snapkv --budget 0.1 --model /path/to/Qwen2.5-VL-7B-Instruct

By default the model is a tiny random Qwen2-VL built locally (no download): its answer is noise,
the eviction numbers are real.
"""
from __future__ import annotations

import argparse
import base64
import io
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from madakv_kernels import MODALITY_TAGS

from .policies import POLICY_NAMES

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo_models"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m madakv_vllm.demo", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model to serve (default: a tiny random Qwen2-VL built in demo_models/)")
    p.add_argument("--policy", default="madakv", choices=[n for n in POLICY_NAMES if n != "none"])
    p.add_argument("--budget", default="0.2", help="ratio of the prompt kept, or a token count (default 0.2)")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    p.add_argument("--images", type=int, default=3, help="images in the chat (default 3)")
    return p.parse_args(argv)


def demo_model() -> Path:
    from .testing.models import build

    path = DEMO_DIR / "tiny-qwen2vl"
    if not (path / "config.json").is_file():
        print(f"building the demo model in {path} (random weights, about a second)")
        build("qwen2vl", path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    started = time.time()
    while True:
        try:
            urllib.request.urlopen(base + "/v1/models", timeout=5)
            print(("\r" if sys.stdout.isatty() else "") + f"server ready after {time.time() - started:.0f} s" + " " * 20)
            return
        except OSError:
            pass
        if proc.poll() is not None:
            sys.exit(f"vllm serve exited with code {proc.returncode}; last lines of {log}:\n"
                     + "\n".join(log.read_text().splitlines()[-15:]))
        if time.time() - started > timeout:
            sys.exit(f"vllm serve was not ready after {timeout:.0f} s; see {log}")
        if sys.stdout.isatty():
            print(f"\rstarting vllm serve ... {time.time() - started:4.0f} s", end="", flush=True)
        time.sleep(1)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def post_json(base: str, path: str, body: dict, timeout: float = 600) -> int:
    """HTTP status of one JSON POST (NaN/inf go out as the non-standard literals Python writes)."""
    import json

    request = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def kv_cache_usage(base: str) -> float:
    """vLLM's own vllm:kv_cache_usage_perc from the server's /metrics (0 when the pool is empty)."""
    text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("vllm:kv_cache_usage_perc{")]
    if not values:
        raise RuntimeError("the server does not export vllm:kv_cache_usage_perc")
    return sum(values)


def eviction_metrics(base: str) -> dict[str, float]:
    from .vllm.metrics import parse_metrics_page

    return parse_metrics_page(urllib.request.urlopen(base + "/metrics", timeout=10).read().decode())


def chat_content(num_images: int) -> list:
    from PIL import Image

    colors = ["red", "green", "blue", "yellow", "purple", "orange"]
    content = []
    for i in range(num_images):
        buffer = io.BytesIO()
        Image.new("RGB", (112, 112), colors[i % len(colors)]).save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        content += [{"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": f"Picture {i + 1} was taken near the river at dawn. " * 8}]
    content.append({"type": "text", "text": "Which picture is green, and what do the pictures have in common?"})
    return content


def main(argv=None) -> None:
    args = parse_args(argv)
    model = Path(args.model) if args.model else demo_model()
    port = args.port or free_port()
    base = f"http://127.0.0.1:{port}"
    vllm = Path(sys.executable).with_name("vllm")
    command = [str(vllm), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
               "--served-model-name", "demo", "--kv-eviction", args.policy, "--kv-eviction-budget", args.budget,
               "--max-model-len", "4096", "--limit-mm-per-prompt", f'{{"image": {args.images}}}']
    if not args.model:  # the tiny model: fast start, small blocks so the freed ones show
        command += ["--dtype", "float32", "--enforce-eager", "--block-size", "32"]
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1" if not args.model else "0"),
           "VLLM_NO_USAGE_STATS": "1"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    log = Path(tempfile.mkdtemp(prefix="madakv-demo-")) / "server.log"
    print("$ " + shlex.join(command))
    if not sys.stdout.isatty():
        print("starting vllm serve (about 30 s on 2 CPU cores) ...")
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(base, proc, log)
        import openai

        client = openai.OpenAI(base_url=base + "/v1", api_key="EMPTY")
        messages = [{"role": "user", "content": chat_content(args.images)}]
        before = eviction_metrics(base)
        reply = client.chat.completions.create(model="demo", messages=messages, max_tokens=32, temperature=0)
        time.sleep(2)  # counters reach /metrics on the next stats tick
        after = eviction_metrics(base)
        delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        print(f"\nanswer ({reply.usage.prompt_tokens} prompt tokens, {reply.usage.completion_tokens} generated)"
              + (", random weights so the text is noise" if not args.model else "") + ":")
        print("  " + (reply.choices[0].message.content or "").strip().replace("\n", "\n  "))
        print(f"\nwhat {args.policy} did at budget {args.budget} (per KV head and layer):")
        for kind in ("kept", "evicted"):
            counts = [(m, delta.get(f"{kind}_{m}", 0.0)) for m in MODALITY_TAGS]
            print(f"  tokens {kind:8s} " + ", ".join(f"{m} {n:.0f}" for m, n in counts))
        print(f"  KV blocks freed  {delta.get('blocks_freed', 0):.0f}")
        count = delta.get("seconds_count", 0)
        if count:
            print(f"  scoring + compaction {1000 * delta.get('seconds_sum', 0) / count:.1f} ms")
        print(f"\nserver log: {log}")
    finally:
        stop_server(proc)
        print("server stopped")


if __name__ == "__main__":
    main()
