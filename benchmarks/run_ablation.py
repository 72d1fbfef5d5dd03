"""MadaKV ablation (MPA on/off x HCC on/off, paper-faithful HCC) on the synthetic suite, run on
the HF reference path (where layers may keep unequal counts, unlike vLLM's one-group regime):

    python benchmarks/run_ablation.py [--samples 4] [--budget 0.2]

Model: SmolLM2-LLaVA (fp32 on CPU), data: the synthetic suite (seed 0). Writes
benchmarks/results/ablation.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--max-new-tokens", type=int, default=16)
    args = p.parse_args()
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    import torch
    from _stamp import smollm2_llava, stamp, synthetic_suite, write_results
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from madakv_vllm.evaluation.milebench import list_tasks, load_task, scorer_for
    from madakv_vllm.hf import generate_with_eviction
    from madakv_vllm.policies import MadaKV

    model_dir, data = smollm2_llava(), synthetic_suite(args.samples)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32,
                                                        attn_implementation="sdpa").eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    variants = {"full cache": None}
    for mpa in (False, True):
        for hcc in (False, True):
            variants[f"MPA {'on' if mpa else 'off'}, HCC {'on' if hcc else 'off'}"] = MadaKV(
                budget=args.budget, mpa=mpa, hcc=hcc)
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    started = time.time()
    samples = [s for task in list_tasks(data) for s in load_task(data, task)]
    for i, sample in enumerate(samples):
        parts = sample.parts()
        content = [{"type": "text", "text": v} if k == "text" else {"type": "image"} for k, v in parts]
        images = [Image.open(v).convert("RGB") for k, v in parts if k == "image"]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                               tokenize=False)
        inputs = processor(text=[prompt], images=images, return_tensors="pt")
        n = inputs["input_ids"].shape[1]
        for name, policy in variants.items():
            with torch.inference_mode():
                out, _ = generate_with_eviction(model, inputs, policy, max_new_tokens=args.max_new_tokens,
                                                do_sample=False)
            prediction = processor.decode(out[0, n:], skip_special_tokens=True)
            scores[name][sample.task].append(scorer_for(sample)(prediction, sample.answer, sample.choices))
        print(f"[{i + 1}/{len(samples)}] {sample.task} #{sample.sample_id} ({n} tokens) "
              f"{time.time() - started:.0f} s", flush=True)
    tasks = sorted({s.task for s in samples})
    lines = ["| variant | " + " | ".join(tasks) + " | mean |", "|---" * (len(tasks) + 2) + "|"]
    table = {}
    for name in variants:
        per_task = [sum(scores[name][t]) / len(scores[name][t]) for t in tasks]
        table[name] = dict(zip(tasks, per_task))
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in per_task)
                     + f" | {sum(per_task) / len(per_task):.2f} |")
    print("\n".join(lines))
    write_results(HERE / "results" / "ablation", dict(stamp=stamp(), model="SmolLM2-LLaVA fp32 (HF)",
                                                     budget=args.budget, samples_per_task=args.samples,
                                                     scores=table, markdown="\n".join(lines)))


if __name__ == "__main__":
    main()
