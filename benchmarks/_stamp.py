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
    """Write out.json, and out.png when matplotlib is there: draw(plt, result) makes the figure
    (the same function benchmarks/tables.py calls to redraw the PNG from the JSON alone)."""
    import json
    from pathlib import Path

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out.with_suffix('.json')}")
    if draw is None:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[eval]')")
        return
    save_plot(draw, result, out.with_suffix(".png"), out.with_suffix(".json"), result["stamp"])
    print(f"wrote {out.with_suffix('.png')}")


# --- plots: one draw(plt, result) -> figure per PNG, titled and tagged by save_plot ---------------

def stamp_line(stamp: dict) -> str:
    """Where a result was measured, as a plot's title says it: machine (or GPU), commit, date
    (after the stamp's "label", when it has one, e.g. which run of a merged result)."""
    return (f"{stamp.get('label', '')}{stamp.get('gpu') or stamp['machine']}, commit {stamp['commit']}, "
            f"{str(stamp['date'])[:10]}")


def _code_of(draw) -> str:
    """The source of a draw function (partials: of the function and their arguments) and of the
    shared helpers below, so a PNG drawn by older plotting code reads as stale."""
    import functools
    import inspect

    from madakv_vllm.evaluation import report

    parts = []
    while isinstance(draw, functools.partial):
        parts.append(repr(sorted(draw.keywords.items())) + repr(draw.args))
        draw = draw.func
    helpers = (save_plot, make_figure, plot_description, stamp_line, bar_panels, label_points, report.budget_axis)
    return "\n".join(parts + [inspect.getsource(f) for f in (draw, *helpers)])


def plot_description(draw, source, stamp: dict | list[dict]) -> str:
    """What a PNG's "Description" metadata says: the data file it was drawn from (with its
    SHA-256), the plotting code's SHA-256 and the stamp. benchmarks/tables.py and the tests compare
    it with the committed PNGs, so one drawn from other data or code fails the check."""
    import hashlib
    from pathlib import Path

    source = Path(source).resolve()
    try:
        where = source.relative_to(Path(HERE).parent).as_posix()
    except ValueError:
        where = source.name
    stamps = stamp if isinstance(stamp, list) else [stamp]
    return (f"drawn from {where} "
            f"(sha256 {hashlib.sha256(source.read_bytes()).hexdigest()[:16]}) by plotting code sha256 "
            f"{hashlib.sha256(_code_of(draw).encode()).hexdigest()[:16]}; measured on "
            + "; ".join(stamp_line(s) for s in stamps))


def save_plot(draw, result, png, source, stamp: dict | list[dict]) -> str:
    """Draw `result` with draw(plt, result), title it with the stamp(s) (machine, commit, date)
    and write png with plot_description as metadata (no software version in it: with the same
    matplotlib, the same data and code give the same bytes). Returns the description."""
    import matplotlib.pyplot as plt

    fig = make_figure(draw, result, stamp)
    description = plot_description(draw, source, stamp)
    fig.savefig(png, dpi=100, metadata={"Description": description, "Software": None})
    plt.close(fig)
    return description


def make_figure(draw, result, stamp: dict | list[dict]):
    """draw(plt, result), titled "measured on" the stamp(s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stamps = stamp if isinstance(stamp, list) else [stamp]
    fig = draw(plt, result)
    fig.suptitle("measured on " + ("\n" if len(stamps) > 1 else "") + "\n".join(stamp_line(s) for s in stamps),
                 fontsize=9)
    fig.tight_layout()
    return fig


def label_points(ax, xs, ys, fmt="{:.2f}", color=None, offset=(0, 6), fontsize=7, values=None):
    """Write each point's value (or the matching one of `values`, e.g. in other units) next to it."""
    for x, y, value in zip(xs, ys, values or ys):
        if y is None:
            continue
        ax.annotate(fmt.format(value), (x, y), textcoords="offset points", xytext=offset, ha="center",
                    fontsize=fontsize, color=color)


HERE = os.path.dirname(os.path.abspath(__file__))


def in_process_vllm_env() -> None:
    """Before importing vLLM: one process (the benchmark reads the scheduler and workers), a KV
    pool the CPU backend can hold, no usage stats, no hub lookups."""
    for key, value in (("VLLM_ENABLE_V1_MULTIPROCESSING", "0"), ("VLLM_CPU_KVCACHE_SPACE", "4"),
                       ("VLLM_NO_USAGE_STATS", "1"), ("HF_HUB_OFFLINE", "1")):
        os.environ.setdefault(key, value)


def bar_panels(plt, rows: list[dict], panels: list[tuple], width: float = 13, colors: list | None = None):
    """One bar chart per (key, title[, format]), bars labelled by each row's "setting" and topped
    with their values."""
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 4.5))
    labels = [r["setting"] for r in rows]
    for ax, (key, title, *fmt) in zip(axes, panels):
        bars = ax.bar(labels, [r[key] for r in rows], color=colors or [f"C{i % 10}" for i in range(len(rows))])
        ax.bar_label(bars, labels=[(fmt[0] if fmt else "{:g}").format(r[key]) for r in rows], fontsize=7,
                     padding=2)
        ax.set(title=title)
        ax.margins(y=0.12)
        ax.tick_params(axis="x", rotation=30, labelsize=7)
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")
    return fig


def smollm2_llava():
    """The SmolLM2-LLaVA judge (its picture reader trained), built into the user cache on first use."""
    from madakv_vllm.testing.models import judge_model

    return judge_model()


DEV_SEED, TEST_SEED = 0, 1  # options are chosen on the dev split; headline numbers come from the test split


def synthetic_suite(samples: int, lengths=None, seed: int = DEV_SEED):
    """The synthetic MileBench-layout suite (default lengths unless given) for a seed: DEV_SEED (the
    split options are chosen on) or TEST_SEED (never used to choose), generated into
    benchmarks/.data/ on first use."""
    from pathlib import Path

    from madakv_vllm.evaluation import synthetic

    lengths = tuple(lengths or synthetic.DEFAULT_LENGTHS)
    path = Path(HERE) / ".data" / f"synthetic-{samples}-{'-'.join(lengths)}{'' if seed == 0 else f'-seed{seed}'}"
    if not all((path / task / f"{task}.json").is_file() for task in synthetic.TASKS):  # new tasks too
        synthetic.generate(path, samples=samples, seed=seed, lengths=lengths)
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


def hf_sweep(model, processor, samples, policies: dict, max_new_tokens: int, desc: str,
             prefill_chunk: int | None = None):
    """Every sample prefilled once on the HF reference path and decoded under every policy
    (`generate_sweep`; policies that evict during prefill prefill alone, in `prefill_chunk`
    chunks): yields (sample, prompt tokens, policy key, prediction, score, report)."""
    import torch
    from tqdm import tqdm

    from madakv_vllm.evaluation.milebench import scorer_for
    from madakv_vllm.hf import generate_sweep

    for sample in tqdm(samples, desc=desc, unit="sample"):
        inputs = hf_inputs(processor, sample)
        n = inputs["input_ids"].shape[1]
        with torch.inference_mode():
            outputs = generate_sweep(model, inputs, policies, max_new_tokens=max_new_tokens,
                                     prefill_chunk=prefill_chunk)
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
