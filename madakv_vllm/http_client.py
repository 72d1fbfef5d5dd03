"""Plumbing for talking to a local `vllm serve` over HTTP: a free port, waiting until the server
answers, stopping it, one JSON POST, and reading its /metrics. Shared by the demo, the smoke test,
the server tests and the accuracy benchmark; standard library only."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    started = time.time()
    while True:
        try:
            urllib.request.urlopen(base + "/v1/models", timeout=5)
            print(("\r" if sys.stdout.isatty() else "") + f"server ready after {time.time() - started:.0f} s"
                  + " " * 20)
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
