"""Reader and scoring for the MileBench layout, so the real benchmark runs unchanged.

Layout (one folder per task):
    ROOT/<Task>/<Task>.json     {"meta_data": {"task_instruction": [...], ...},
                                 "data": [{"sample_id", "task_instruction_id",
                                           "task_instance": {"context", "images_path",
                                                             "choice_list"?}, "response"}]}
    ROOT/<Task>/images/<file>   the images named in images_path
The context refers to its images as {image#k} or {table#k} (1-based). The prompt is the task
instruction, then the context with each placeholder replaced by the image, then for choice
tasks "Choice list:[...]. Your answer is:".
"""
from __future__ import annotations

import json
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

_PLACEHOLDER = re.compile(r"\{(?:image|table)#(\d+)\}")


@dataclass
class Sample:
    task: str
    sample_id: str
    instruction: str
    context: str
    image_paths: list[Path]
    answer: str
    choices: list[str] = field(default_factory=list)

    def parts(self) -> list[tuple[str, str | Path]]:
        """The prompt as ("text", str) and ("image", path) parts, in order."""
        parts: list[tuple[str, str | Path]] = [("text", self.instruction)]
        pos = 0
        for match in _PLACEHOLDER.finditer(self.context):
            parts.append(("text", self.context[pos:match.start()]))
            parts.append(("image", self.image_paths[int(match.group(1)) - 1]))
            pos = match.end()
        parts.append(("text", self.context[pos:]))
        if self.choices:
            parts.append(("text", "Choice list:[" + ", ".join(f"'{c}'" for c in self.choices) + "]. Your answer is:"))
        merged: list[tuple[str, str | Path]] = []
        for kind, value in parts:
            if kind == "text" and merged and merged[-1][0] == "text":
                merged[-1] = ("text", merged[-1][1] + value)
            elif kind != "text" or value:
                merged.append((kind, value))
        return merged


def load_task(root: str | Path, task: str, limit: int | None = None) -> list[Sample]:
    folder = Path(root) / task
    path = folder / f"{task}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no MileBench task file {path}")
    payload = json.loads(path.read_text())
    instructions = payload.get("meta_data", payload.get("metadata", {})).get("task_instruction", [""])
    samples = []
    for item in payload["data"][:limit]:
        instance = item["task_instance"]
        samples.append(Sample(
            task=task, sample_id=str(item["sample_id"]),
            instruction=instructions[item.get("task_instruction_id", 0)] if instructions else "",
            context=instance["context"], image_paths=[folder / "images" / p for p in instance.get("images_path", [])],
            answer=str(item["response"]), choices=[str(c) for c in instance.get("choice_list") or []]))
    return samples


def list_tasks(root: str | Path) -> list[str]:
    return sorted(p.name for p in Path(root).iterdir() if (p / f"{p.name}.json").is_file())


# ---- scoring ----------------------------------------------------------------------------------
def normalize(text: str) -> str:
    text = text.lower().strip()
    text = text.translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def exact_match(prediction: str, answer: str, choices: list[str]) -> float:
    return float(normalize(prediction) == normalize(answer))


def substring_match(prediction: str, answer: str, choices: list[str]) -> float:
    return float(normalize(answer) in normalize(prediction))


def choice_accuracy(prediction: str, answer: str, choices: list[str]) -> float:
    """The option the prediction names (its letter, or its text) must be the answer's."""
    picked = pick_choice(prediction, choices)
    target = pick_choice(answer, choices) if answer not in choices else answer
    return float(picked is not None and picked == target)


def pick_choice(prediction: str, choices: list[str]) -> str | None:
    text = prediction.strip()
    letter = re.match(r"^\(?([A-Z])[\).:\s]|^\(?([A-Z])$", text)
    if letter:
        index = ord((letter.group(1) or letter.group(2))) - ord("A")
        if 0 <= index < len(choices):
            return choices[index]
    found = [c for c in choices if normalize(c) and normalize(c) in normalize(text)]
    return max(found, key=len) if found else None


def rouge_l(prediction: str, answer: str, choices: list[str]) -> float:
    """ROUGE-L F1 over whitespace tokens (MileBench's metric for open-ended tasks)."""
    a, b = normalize(prediction).split(), normalize(answer).split()
    if not a or not b:
        return 0.0
    lcs = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            lcs[i + 1][j + 1] = lcs[i][j] + 1 if x == y else max(lcs[i][j + 1], lcs[i + 1][j])
    common = lcs[-1][-1]
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall)


def all_words_match(prediction: str, answer: str, choices: list[str]) -> float:
    """Every word of the answer somewhere in the prediction (answers with two facts)."""
    said = set(normalize(prediction).split())
    return float(all(word in said for word in normalize(answer).split()))


Scorer = Callable[[str, str, list[str]], float]


def scorer_for(sample: Sample) -> Scorer:
    """Exact match for MileBench's needle tasks (substring for our synthetic ones, every word for
    the mixed one), accuracy for choice tasks, ROUGE-L for open answers."""
    if sample.task == "SyntheticMixedNeedle":
        return all_words_match
    if sample.task.startswith("Synthetic") and "Needle" in sample.task:
        return substring_match
    if "Needle" in sample.task:
        return exact_match
    if sample.choices:
        return choice_accuracy
    return rouge_l
