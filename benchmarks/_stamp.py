"""What every benchmark shares: the machine/versions/commit stamp and writing its results."""
from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def stamp() -> dict:
    import torch

    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=os.path.dirname(__file__), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    return info


def write_results(out, result: dict, draw=None) -> None:
    """Write out.json, and out.png when matplotlib is there: draw(plt) makes the figure."""
    import json
    from pathlib import Path

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out.with_suffix('.json')}")
    if draw is None:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[eval]')")
        return
    fig = draw(plt)
    fig.suptitle(result["stamp"].get("gpu", result["stamp"]["machine"]))
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
    print(f"wrote {out.with_suffix('.png')}")


HERE = os.path.dirname(os.path.abspath(__file__))


def in_process_vllm_env() -> None:
    """Before importing vLLM: one process (the benchmark reads the scheduler and workers), a KV
    pool the CPU backend can hold, no usage stats, no hub lookups."""
    for key, value in (("VLLM_ENABLE_V1_MULTIPROCESSING", "0"), ("VLLM_CPU_KVCACHE_SPACE", "4"),
                       ("VLLM_NO_USAGE_STATS", "1"), ("HF_HUB_OFFLINE", "1")):
        os.environ.setdefault(key, value)


def bar_panels(plt, rows: list[dict], panels: list[tuple[str, str]], width: float = 13):
    """One bar chart per (key, title), bars labelled by each row's "setting"."""
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 4.5))
    labels = [r["setting"] for r in rows]
    for ax, (key, title) in zip(axes, panels):
        ax.bar(labels, [r[key] for r in rows])
        ax.set(title=title)
        ax.tick_params(axis="x", rotation=25)
    return fig


def smollm2_llava():
    """The SmolLM2-LLaVA judge (its picture reader trained), built into the user cache on first use."""
    from madakv_vllm.testing.models import judge_model

    return judge_model()


def synthetic_suite(samples: int, lengths=None):
    """The synthetic MileBench-layout suite (seed 0; default lengths unless given), generated into
    benchmarks/.data/ on first use."""
    from pathlib import Path

    from madakv_vllm.evaluation import synthetic

    lengths = tuple(lengths or synthetic.DEFAULT_LENGTHS)
    path = Path(HERE) / ".data" / f"synthetic-{samples}-{'-'.join(lengths)}"
    if not all((path / task / f"{task}.json").is_file() for task in synthetic.TASKS):  # new tasks too
        synthetic.generate(path, samples=samples, seed=0, lengths=lengths)
    return path


def suite_samples(data, tasks=None, start: int = 0) -> list:
    """The suite's samples (only `tasks`, when given; from each task's `start`-th on) with the
    tasks taking turns, so a run stopped early has them in equal numbers."""
    from madakv_vllm.evaluation.milebench import list_tasks, load_task

    per_task = [load_task(data, task)[start:] for task in list_tasks(data) if not tasks or task in tasks]
    return [sample for turn in zip(*per_task) for sample in turn]


PREFIX_CACHE_NOTE = "reset before every setting (no setting reuses another's cached prompt blocks)"


def drive(llm, prompts, params) -> dict:
    """Add the prompts to a vLLM engine and step it until all finish. Returns wall seconds, the
    peak number of running requests and, per request, seconds to the first token, to the second
    (eviction's compaction runs in the step that makes it), to the last, output and prompt tokens.
    The prefix cache is emptied first: settings run one after another on one engine, and a later
    one must not reuse an earlier one's prompt blocks (PREFIX_CACHE_NOTE goes into every JSON)."""
    import time

    if not llm.reset_prefix_cache():
        raise RuntimeError("could not reset the prefix cache between settings (requests still running?)")
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}-{start}", prompt, params)
    first, second, finished, peak = {}, {}, {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            now = time.perf_counter() - start
            produced = len(out.outputs[0].token_ids)
            if produced and out.request_id not in first:
                first[out.request_id] = now
            if produced >= 2 and out.request_id not in second:
                second[out.request_id] = now
            if out.finished:
                finished[out.request_id] = (now, produced, len(out.prompt_token_ids or ()))
        peak = max(peak, len(scheduler.running))
    return dict(wall_s=time.perf_counter() - start, peak_running=peak,
                requests=[dict(ttft_s=first[r], second_s=second.get(r, done), done_s=done, tokens=tokens,
                               prompt_tokens=prompt) for r, (done, tokens, prompt) in finished.items()])


def hf_judge():
    """SmolLM2-LLaVA on the HF reference path (fp32, sdpa) and its processor."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = smollm2_llava()
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    return model, AutoProcessor.from_pretrained(path)


def hf_sweep(model, processor, samples, policies: dict, max_new_tokens: int, desc: str):
    """Every sample prefilled once on the HF reference path and decoded under every policy
    (`generate_sweep`): yields (sample, prompt tokens, policy key, prediction, score, report)."""
    import torch
    from tqdm import tqdm

    from madakv_vllm.evaluation.milebench import scorer_for
    from madakv_vllm.hf import generate_sweep

    for sample in tqdm(samples, desc=desc, unit="sample"):
        inputs = hf_inputs(processor, sample)
        n = inputs["input_ids"].shape[1]
        with torch.inference_mode():
            outputs = generate_sweep(model, inputs, policies, max_new_tokens=max_new_tokens)
        for key, (ids, report) in outputs.items():
            prediction = processor.decode(ids[0, n:], skip_special_tokens=True)
            yield sample, n, key, prediction, scorer_for(sample)(prediction, sample.answer, sample.choices), report


def hf_inputs(processor, sample):
    """A MileBench sample as the chat prompt the server would build: the model inputs."""
    from PIL import Image

    parts = sample.parts()
    content = [{"type": "text", "text": v} if k == "text" else {"type": "image"} for k, v in parts]
    images = [Image.open(v).convert("RGB") for k, v in parts if k == "image"]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                           tokenize=False)
    return processor(text=[prompt], images=images or None, return_tensors="pt")
