"""Synthetic long multimodal tasks written in the MileBench layout (fixed seeds, no downloads),
designed so that SmolLM2-135M-Instruct (the SmolLM2-LLaVA judge) answers them with its full cache:

- SyntheticTextNeedle: images interleaved with filler paragraphs; one sentence inside a
  paragraph (any but the first) says "The secret word is W." (W a common one-token-ish word); the question asks for W.
- SyntheticPasskeyNeedle: the classic pass key (a five-digit number stated twice in one spot),
  a multi-token fact that single-token ranking can break.
- SyntheticImageNeedle: the answer is only in one picture among the haystack's: a picture of the
  secret word (the judge's vision side is trained to read such pictures as "The secret word is
  W.", see madakv_vllm/testing/vision.py); the other pictures show coloured squares.
- SyntheticMixedNeedle: the question needs one picture (the secret word) and one sentence ("The
  secret color is C." inside a paragraph); both must be in the answer.
- SyntheticNoisyPicturesNeedle: the text needle among six times as many pictures of random
  noise, which carry nothing yet draw attention (about 8 % of a head's mass on 30 % of the
  tokens, more per picture token than plain filler text gets): the other side of a modality
  split, where a rule that hands pictures slots for what they draw or need starves the text.
All ask their question before the text (in the task instruction) and again after it: a 135M
model reads a long context for the question it already knows. They are scored by substring match
(small models answer in a sentence, "The pass key is 27611."; the mixed task needs every word of
its answer).
Lengths are set in words (about one token each with SmolLM2's tokenizer) plus 16 tokens per image
with the SmolLM2-LLaVA judge; samples cycle through the lengths asked for. The default is 1K
tokens, inside the range where the judge still reads (see benchmarks/run_lengths.py).
    python -m madakv_vllm.evaluation.synthetic OUT_DIR [--samples 100] [--seed 0] [--lengths 1k 2k]
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from ..testing.vision import WORD_PICTURES, render_shapes, render_word

SENTENCES = (
    "The weather was mild and the market was busy.", "A train left the station just after noon.",
    "The library closed early on Sundays.", "Children played near the river until the evening.",
    "The baker opened his shop before sunrise.", "Fresh snow covered the mountain road.",
    "A painter sat by the harbor with her brushes.", "The old bridge was repaired last summer.",
    "Lanterns lit the narrow streets of the village.", "The orchard was full of ripe apples.",
    "A letter arrived from a distant cousin.", "The teacher read a story to the class.",
)
# common words: SmolLM2-135M copies them far more reliably than rare ones (apricot, thistle, ...);
# the same words the judge's pictures can show
SECRETS = WORD_PICTURES
SECRET_COLORS = ("red", "green", "blue", "yellow", "purple", "pink", "black", "white")  # none is a secret word
# name: (filler words, images); prompt tokens with SmolLM2-LLaVA about 1K, 2K, 4K, 7.5K
LENGTHS = {"1k": (700, 4), "2k": (1500, 8), "4k": (3200, 12), "8k": (6300, 16)}
DEFAULT_LENGTHS = ("1k",)


def _paragraph(rng: random.Random, words: int) -> str:
    """Plain filler sentences (a small model must still read them as text) of about `words` words."""
    out, count = [], 0
    while count < words:
        out.append(rng.choice(SENTENCES))
        count += len(out[-1].split())
    return " ".join(out)


def render_noise(rng: random.Random, size: int = 56):
    """A haystack picture of random pixels: nothing to read, unlike anything the reader learnt."""
    from PIL import Image

    return Image.frombytes("RGB", (size, size), bytes(rng.randrange(256) for _ in range(size * size * 3)))


def _haystack(rng, folder: Path, sample_id: int, total_words: int, images: int, picture=render_shapes):
    """Paragraph texts and image placeholders, alternating; returns (chunks, image file names)."""
    chunks, names = [], []
    per_chunk = max(20, total_words // (images + 1))
    for k in range(images):
        chunks.append(_paragraph(rng, per_chunk))
        name = f"s{sample_id}_img{k + 1}.png"
        picture(rng).save(folder / "images" / name)
        names.append(name)
        chunks.append(f"{{image#{k + 1}}}")
    chunks.append(_paragraph(rng, per_chunk))
    return chunks, names


def _insert_sentence(rng: random.Random, chunks: list[str], sentence: str) -> None:
    """`sentence` between two sentences of a random paragraph of the haystack, never the first:
    SmolLM2-135M confuses a fact there with the opening words (a third of such samples answered wrong)."""
    text = rng.randrange(2, len(chunks), 2)  # even chunks are paragraphs, odd ones pictures
    sentences = chunks[text].rstrip(".").split(". ")
    sentences.insert(rng.randrange(0, len(sentences) + 1), sentence.rstrip("."))
    chunks[text] = ". ".join(sentences) + "."


def _needle(folder: Path, samples: int, rng: random.Random, lengths, plant, question: str,
            picture=render_shapes, pictures_per_image: int = 1) -> list[dict]:
    """Haystacks with a fact planted by `plant(rng, chunks, folder, picture names)`, which returns
    the answer; the question follows the haystack. `pictures_per_image`: pictures in place of
    each of the length's images (drawn by `picture`)."""
    data = []
    for i in range(samples):
        words, images = LENGTHS[lengths[i % len(lengths)]]
        chunks, names = _haystack(rng, folder, i, words, images * pictures_per_image, picture)
        answer = plant(rng, chunks, folder, names)
        context = " ".join(chunks) + " " + question
        data.append({"sample_id": i, "task_instruction_id": 0, "length": lengths[i % len(lengths)],
                     "task_instance": {"context": context, "images_path": names}, "response": answer})
    return data


def _sentence_fact(pick, fact: str):
    def plant(rng, chunks, folder, names):
        answer = pick(rng)
        _insert_sentence(rng, chunks, fact.format(answer))
        return answer
    return plant


def _picture_fact(rng: random.Random, chunks: list[str], folder: Path, names: list[str]) -> str:
    """Redraw one of the haystack's pictures as a picture of a secret word; returns the word."""
    word = rng.choice(SECRETS)
    render_word(word, rng).save(folder / "images" / rng.choice(names))
    return word


def _picture_and_sentence(rng: random.Random, chunks: list[str], folder: Path, names: list[str]) -> str:
    word = _picture_fact(rng, chunks, folder, names)
    color = rng.choice(SECRET_COLORS)
    _insert_sentence(rng, chunks, f"The secret color is {color}.")
    return f"{color} {word}"


def text_needle(folder: Path, samples: int, rng: random.Random, lengths) -> list[dict]:
    return _needle(folder, samples, rng, lengths, _sentence_fact(lambda r: r.choice(SECRETS), "The secret word is {}."),
                   "What is the secret word?")


def noisy_pictures_needle(folder: Path, samples: int, rng: random.Random, lengths) -> list[dict]:
    return _needle(folder, samples, rng, lengths, _sentence_fact(lambda r: r.choice(SECRETS), "The secret word is {}."),
                   "What is the secret word?", picture=render_noise, pictures_per_image=6)


def passkey_needle(folder: Path, samples: int, rng: random.Random, lengths) -> list[dict]:
    return _needle(folder, samples, rng, lengths,
                   _sentence_fact(lambda r: str(r.randrange(10000, 100000)),
                                  "The pass key is {0}. Remember it. {0} is the pass key."),
                   "What is the pass key?")


def image_needle(folder: Path, samples: int, rng: random.Random, lengths) -> list[dict]:
    return _needle(folder, samples, rng, lengths, _picture_fact, "What is the secret word?")


# the colour first: asked for the word first, the judge often stopped after it; with a two-digit
# number instead of a colour it often gave the number twice (full cache 0.67 over 24 samples)
MIXED_QUESTION = "What are the secret color and the secret word?"


def mixed_needle(folder: Path, samples: int, rng: random.Random, lengths) -> list[dict]:
    return _needle(folder, samples, rng, lengths, _picture_and_sentence, MIXED_QUESTION)


INSTRUCTION = "Read the text and pictures below, then answer the question: {} "
TASKS = {  # name: (generator, instruction with the question, seed offset: tasks do not depend on each other)
    "SyntheticTextNeedle": (text_needle, INSTRUCTION.format("What is the secret word?"), 1),
    "SyntheticPasskeyNeedle": (passkey_needle, INSTRUCTION.format("What is the pass key?"), 2),
    "SyntheticImageNeedle": (image_needle, INSTRUCTION.format("What is the secret word?"), 3),
    "SyntheticMixedNeedle": (mixed_needle, INSTRUCTION.format(MIXED_QUESTION), 4),
    "SyntheticNoisyPicturesNeedle": (noisy_pictures_needle, INSTRUCTION.format("What is the secret word?"), 5),
}


def generate(out: str | Path, samples: int = 100, seed: int = 0, lengths=DEFAULT_LENGTHS) -> list[Path]:
    """Write every synthetic task under `out`; same arguments, same bytes."""
    unknown = set(lengths) - set(LENGTHS)
    if unknown or not lengths:
        raise ValueError(f"unknown lengths {sorted(unknown)}; choose from {', '.join(LENGTHS)}")
    written = []
    for task, (make, instruction, offset) in TASKS.items():
        folder = Path(out) / task
        (folder / "images").mkdir(parents=True, exist_ok=True)
        data = make(folder, samples, random.Random(seed * 1000 + offset), tuple(lengths))
        payload = {"meta_data": {"task": task, "task_instruction": [instruction], "seed": seed,
                                 "lengths": list(lengths)}, "data": data}
        path = folder / f"{task}.json"
        path.write_text(json.dumps(payload, indent=1))
        written.append(path)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m madakv_vllm.evaluation.synthetic",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("--samples", type=int, default=100, help="samples per task (default 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lengths", nargs="+", default=list(DEFAULT_LENGTHS), choices=list(LENGTHS),
                        help="prompt lengths the samples cycle through (default: 1k)")
    args = parser.parse_args(argv)
    for path in generate(args.out, args.samples, args.seed, args.lengths):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
