"""Prompts shared by the HF and vLLM tests: the same multimodal chat for both."""
from PIL import Image

from madakv_vllm.policies import POLICY_NAMES

COLORS = ["red", "green", "blue", "yellow"]


def images(num: int, size: int = 56) -> list:
    return [Image.new("RGB", (size, size), COLORS[i % len(COLORS)]) for i in range(num)]


def chat_content(num_images: int, filler_repeats: int = 4, image_part=lambda img: {"type": "image"}) -> list:
    content = []
    for i, img in enumerate(images(num_images)):
        content += [image_part(img), {"type": "text", "text": f"picture {i} shows a cat on the left " * filler_repeats}]
    content.append({"type": "text", "text": "the dog sits by the river near the house " * filler_repeats
                    + "what color is the first image"})
    return content


def hf_inputs(processor, num_images: int, filler_repeats: int = 4):
    """Processor inputs (HF side)."""
    text = processor.apply_chat_template([{"role": "user", "content": chat_content(num_images, filler_repeats)}],
                                         add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=images(num_images) or None, return_tensors="pt")


def vllm_messages(num_images: int, filler_repeats: int = 4) -> list:
    """The same chat for vLLM's LLM.chat (images passed as PIL objects)."""
    content = chat_content(num_images, filler_repeats, image_part=lambda img: {"type": "image_pil", "image_pil": img})
    return [{"role": "user", "content": content}]


def milebench_task(root, samples: int = 2, num_images: int = 2, filler_repeats: int = 30, task: str = "LongCaptions"):
    """A MileBench-layout task with long enough prompts to evict; returns root."""
    import json
    from pathlib import Path

    folder = Path(root) / task
    (folder / "images").mkdir(parents=True, exist_ok=True)
    data = []
    for sample in range(samples):
        names = [f"s{sample}_{i}.png" for i in range(num_images)]
        for name, img in zip(names, images(num_images)):
            img.save(folder / "images" / name)
        context = " ".join(f"{{image#{i + 1}}} picture {i} shows a cat on the left " * 1
                           + "the dog sits by the river near the house " * filler_repeats for i in range(num_images))
        data.append({"sample_id": sample, "task_instruction_id": 0, "response": "a cat",
                     "task_instance": {"context": context + " what is in the first picture", "images_path": names}})
    payload = {"meta_data": {"task_instruction": ["Answer briefly. "], "question_type": "open-ended"}, "data": data}
    (folder / f"{task}.json").write_text(json.dumps(payload))
    return Path(root)


XARG_KEYS = ["kv_eviction", "kv_eviction_budget", "kv_eviction_window", "some_other_key"]
POLICIES = list(POLICY_NAMES)


def random_xarg_value(rng):
    """Anything a client might send in vllm_xargs: good, bad, odd and hostile values."""
    return rng.choice([
        0, 1, 2, -1, 7, 32, 10**9, 2**31, 10**30, 0.0, 1e-9, 0.004, 0.2, 0.5, 1.0, 1.5, -0.3, float("nan"),
        float("inf"), True, False, None, "", "0.2", "8", "madakv", "none", "snapkv", [], [1], {}, {"x": 1},
        rng.randint(-5, 5000), rng.random()])


def random_xargs(rng) -> dict:
    xargs = {key: random_xarg_value(rng) for key in rng.sample(XARG_KEYS, rng.randint(0, len(XARG_KEYS)))}
    if "kv_eviction" in xargs and rng.random() < 0.5:
        xargs["kv_eviction"] = rng.choice(POLICIES)
    if "kv_eviction_budget" in xargs and rng.random() < 0.4:
        xargs["kv_eviction_budget"] = rng.choice([rng.random(), rng.randint(1, 600), 1.0, 0.01])
    return xargs
