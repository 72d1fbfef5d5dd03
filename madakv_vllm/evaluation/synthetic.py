"""Synthetic long multimodal tasks written in the MileBench layout (fixed seeds, no downloads).

- SyntheticTextNeedle (TN-like): many images interleaved with filler paragraphs; one sentence
  hides a secret word; the question asks for it (substring match: small models answer in a
  sentence).
- SyntheticPasskeyNeedle: the classic pass-key retrieval (a five-digit number stated twice in
  one spot of the haystack), the easiest needle for a small model (substring match).
- SyntheticChoice: many images and paragraphs, each paragraph names where a person went; the
  question asks where one of them went, with four options (accuracy).
Lengths are set in words (about one token each with SmolLM2's tokenizer; 16 per image with
the SmolLM2-LLaVA test model) so that prompts span about 1K to 8K tokens.
    python -m madakv_vllm.evaluation.synthetic OUT_DIR [--samples 20] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SENTENCES = (
    "The weather was mild and the market was busy.", "A train left the station just after noon.",
    "The library closed early on Sundays.", "Children played near the river until the evening.",
    "The baker opened his shop before sunrise.", "Fresh snow covered the mountain road.",
    "A painter sat by the harbor with her brushes.", "The old bridge was repaired last summer.",
    "Lanterns lit the narrow streets of the village.", "The orchard was full of ripe apples.",
    "A letter arrived from a distant cousin.", "The teacher read a story to the class.",
)
SECRETS = ("apricot", "walrus", "cobalt", "saffron", "juniper", "lagoon", "marble", "quartz", "thistle", "velvet")
PEOPLE = ("Anna", "Bruno", "Chen", "Dalia", "Emeka", "Farah", "Goran", "Hana", "Ivo", "Jana")
PLACES = ("Lisbon", "Oslo", "Kyoto", "Nairobi", "Lima", "Quebec", "Tbilisi", "Hanoi", "Dakar", "Perth")
COLORS = [(200, 40, 40), (40, 160, 60), (40, 70, 200), (220, 200, 40), (140, 60, 170), (240, 140, 30)]
LENGTHS_WORDS = (700, 1500, 3200, 6300)  # with 4-16 images: ~1K, 2K, 4K, 7.5K tokens for SmolLM2-LLaVA


def _paragraph(rng: random.Random, words: int) -> str:
    """Plain filler sentences (a small model must still read them as text) of about `words` words."""
    out, count = [], 0
    while count < words:
        out.append(rng.choice(SENTENCES))
        count += len(out[-1].split())
    return " ".join(out)


def _write_image(path: Path, rng: random.Random) -> None:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (112, 112), rng.choice(COLORS))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x, y = rng.randrange(0, 90), rng.randrange(0, 90)
        draw.rectangle([x, y, x + 20, y + 20], fill=rng.choice(COLORS))
    img.save(path)


def _haystack(rng, folder: Path, sample_id: int, total_words: int, images: int):
    """Paragraph texts and image placeholders, alternating; returns (chunks, image file names)."""
    chunks, names = [], []
    per_chunk = max(20, total_words // (images + 1))
    for k in range(images):
        chunks.append(_paragraph(rng, per_chunk))
        name = f"s{sample_id}_img{k + 1}.png"
        _write_image(folder / "images" / name, rng)
        names.append(name)
        chunks.append(f"{{image#{k + 1}}}")
    chunks.append(_paragraph(rng, per_chunk))
    return chunks, names


def _needle(folder: Path, samples: int, rng: random.Random, pick, fact: str, question: str) -> list[dict]:
    """One fact (`fact` formatted with the answer `pick(rng)`) at a random depth of the haystack."""
    data = []
    for i in range(samples):
        words = LENGTHS_WORDS[i % len(LENGTHS_WORDS)]
        chunks, names = _haystack(rng, folder, i, words, images=4 + (i % 4) * 4)
        answer = pick(rng)
        depth = rng.randrange(0, len(chunks))
        chunks.insert(depth if not chunks[depth].startswith("{image#") else depth + 1, fact.format(answer))
        context = " ".join(chunks) + " " + question
        data.append({"sample_id": i, "task_instruction_id": 0,
                     "task_instance": {"context": context, "images_path": names}, "response": answer})
    return data


def text_needle(folder: Path, samples: int, rng: random.Random) -> list[dict]:
    return _needle(folder, samples, rng, lambda r: r.choice(SECRETS), "Remember this: the secret word is {}.",
                   "What is the secret word?")


def passkey_needle(folder: Path, samples: int, rng: random.Random) -> list[dict]:
    return _needle(folder, samples, rng, lambda r: str(r.randrange(10000, 100000)),
                   "The pass key is {0}. Remember it. {0} is the pass key.", "What is the pass key?")


def choice(folder: Path, samples: int, rng: random.Random) -> list[dict]:
    data = []
    for i in range(samples):
        words = LENGTHS_WORDS[i % len(LENGTHS_WORDS)]
        chunks, names = _haystack(rng, folder, i, words, images=4 + (i % 4) * 4)
        people = rng.sample(PEOPLE, 4)
        places = rng.sample(PLACES, 4)
        for person, place in zip(people, places):
            chunks.insert(rng.randrange(0, len(chunks) + 1), f"{person} travelled to {place}.")
        asked = rng.randrange(4)
        context = " ".join(chunks) + f" Where did {people[asked]} travel to?"
        data.append({"sample_id": i, "task_instruction_id": 0,
                     "task_instance": {"context": context, "images_path": names, "choice_list": places},
                     "response": places[asked]})
    return data


TASKS = {  # name: (generator, instruction, seed offset: a task's samples do not depend on the others)
    "SyntheticChoice": (choice, "Read the text and pictures below, then choose the right option. ", 0),
    "SyntheticTextNeedle": (text_needle, "Read the text and pictures below, then answer the question. ", 1),
    "SyntheticPasskeyNeedle": (passkey_needle, "Read the text and pictures below, then answer the question. ", 2),
}


def generate(out: str | Path, samples: int = 20, seed: int = 0) -> list[Path]:
    """Write every synthetic task under `out`; same arguments, same bytes."""
    written = []
    for task, (make, instruction, offset) in TASKS.items():
        folder = Path(out) / task
        (folder / "images").mkdir(parents=True, exist_ok=True)
        data = make(folder, samples, random.Random(seed * 1000 + offset))
        payload = {"meta_data": {"task": task, "task_instruction": [instruction], "seed": seed}, "data": data}
        path = folder / f"{task}.json"
        path.write_text(json.dumps(payload, indent=1))
        written.append(path)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m madakv_vllm.evaluation.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("--samples", type=int, default=20, help="samples per task (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in generate(args.out, args.samples, args.seed):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
