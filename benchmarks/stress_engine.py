"""Long randomized engine run (the seam's reliability bar): thousands of random requests, then
checks that nothing leaked and that a sample of finished requests equals their solo reruns.

    python benchmarks/stress_engine.py                      # 2000 requests (~minutes on 2 cores)
    python benchmarks/stress_engine.py --requests 200 --seed 3

Tiny random Qwen2-VL (fp32), 96 KV blocks of 32 tokens, prefill chunks of 256 tokens, up to 16
requests in flight. Writes benchmarks/results/stress.json (counts, time, machine stamp); exits 1
when anything leaked or a solo rerun differs.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _stamp import HERE, in_process_vllm_env, stamp, write_results  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--solo-sample", type=int, default=60, help="finished requests rerun alone and compared")
    p.add_argument("--layer-groups", type=int, default=1, help="KV-cache groups (the tiny model has 2 layers)")
    p.add_argument("--out", default=str(Path(HERE) / "results" / "stress"))
    args = p.parse_args()
    in_process_vllm_env()
    from tqdm import tqdm
    from vllm import LLM

    from madakv_vllm.testing.models import build
    from madakv_vllm.testing.stress import engine_settings, run
    from madakv_vllm.vllm.requests import CONFIG_KEY

    model = Path(HERE) / ".models" / "qwen2vl-tiny"
    if not (model / "config.json").is_file():
        build("qwen2vl", model)
    settings = engine_settings(layer_groups=args.layer_groups)
    llm = LLM(model=str(model), **settings)
    with tqdm(total=args.requests, desc="stress", unit="req") as bar:
        report = run(llm, args.requests, seed=args.seed, solo_sample=args.solo_sample, progress=bar)
    result = dict(stamp=stamp(), engine={k: v for k, v in settings.items() if k != "additional_config"},
                  eviction=settings["additional_config"][CONFIG_KEY], layer_groups=args.layer_groups, seed=args.seed,
                  report=dataclasses.asdict(report), ok=report.ok())
    for key, value in dataclasses.asdict(report).items():
        print(f"{key:24s} {value}")
    write_results(args.out, result)
    print("stress: " + ("PASS" if report.ok() else "FAIL"))
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
