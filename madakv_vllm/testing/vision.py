"""Teach the SmolLM2-LLaVA judge to read its pictures, so image needles can be judged.

The language model stays frozen. The small CLIP tower and the projector are trained so that a
picture of a word W (`render_word`) comes out as the LM's own input embeddings of the sentence
"The secret word is W." (padded to the picture's 16 tokens), and a picture of coloured squares
(`render_shapes`, the haystack's other pictures) as those of "A picture of colored squares.".
The LM then reads a word picture as it reads that sentence in text. The target is taken from the
frozen LM's embedding table, so training needs no forward pass through the LM (a regression plus
a cross-entropy over the distances to every caption, not a captioning loss): about 2 minutes on
2 CPU cores, deterministic for a seed.

Data: `TRAIN_IMAGES` pictures rendered once (half words from `WORD_PICTURES`, half squares; ink,
paper, a noise square and a few pixels of placement drawn at random), the processor's own
preprocessing; `TEST_IMAGES` fresh renders from another seed measure how often the nearest
caption is the right one (`reader_accuracy`).
"""
from __future__ import annotations

import random
import time

WORD_CAPTION = "The secret word is {}."
SHAPES_CAPTION = "A picture of colored squares."
# the words a picture can show (the image-needle task's answers; the text needle's words too)
WORD_PICTURES = ("tiger", "piano", "candle", "rocket", "garden", "silver", "orange", "pencil", "dragon", "basket")
SQUARE_COLORS = [(200, 40, 40), (40, 160, 60), (40, 70, 200), (220, 200, 40), (140, 60, 170), (240, 140, 30)]
PAPER_COLORS = [(245, 245, 235), (235, 240, 250), (250, 235, 225), (230, 245, 230), (255, 255, 255)]
INK_COLORS = [(20, 20, 20), (30, 30, 110), (100, 20, 20), (10, 70, 30)]
TRAIN_IMAGES, TEST_IMAGES, STEPS, BATCH, TEMPERATURE, LR = 4000, 400, 2500, 64, 0.005, 1e-3


def render_shapes(rng: random.Random, size: int = 56):
    """A haystack picture: three squares on a coloured background, no text."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), rng.choice(SQUARE_COLORS))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x, y = rng.randrange(0, size - 22), rng.randrange(0, size - 22)
        draw.rectangle([x, y, x + 20, y + 20], fill=rng.choice(SQUARE_COLORS))
    return img


def render_word(word: str, rng: random.Random, size: int = 56):
    """A needle picture: `word` in dark ink on light paper, left-aligned across the middle row
    of patches (a few pixels of jitter: the 2-layer tower reads words at a steady place), with a
    small coloured square in a corner as noise."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (size, size), rng.choice(PAPER_COLORS))
    draw = ImageDraw.Draw(img)
    x, y = rng.choice((rng.randrange(0, 6), rng.randrange(size - 12, size - 6))), rng.choice((1, size - 8))
    draw.rectangle([x, y, x + 6, y + 6], fill=rng.choice(SQUARE_COLORS))
    font = ImageFont.load_default(size=14)
    top, bottom = font.getbbox(word)[1], font.getbbox(word)[3]
    draw.text((rng.randrange(0, 4), (size - (bottom - top)) // 2 - top + rng.randrange(-2, 3)), word,
              fill=rng.choice(INK_COLORS), font=font)
    return img


def _targets(model, tokenizer, tokens_per_image: int):
    """Caption embeddings per class (index i < len(WORD_PICTURES): that word; last: squares),
    each caption padded with the space token to the picture's token count."""
    import torch

    table = model.get_input_embeddings().weight.detach().float()
    space = tokenizer(" ", add_special_tokens=False)["input_ids"][-1]
    captions = [WORD_CAPTION.format(w) for w in WORD_PICTURES] + [SHAPES_CAPTION]
    rows = []
    for caption in captions:
        ids = tokenizer(caption, add_special_tokens=False)["input_ids"]
        if len(ids) > tokens_per_image:
            raise ValueError(f"caption {caption!r} has {len(ids)} tokens, a picture has {tokens_per_image}")
        rows.append(table[ids + [space] * (tokens_per_image - len(ids))])
    return torch.stack(rows)


def _dataset(image_processor, count: int, seed: int):
    """`count` rendered pictures (pixel tensors) and their class (see _targets)."""
    import torch

    rng = random.Random(seed)
    images, labels = [], []
    for i in range(count):
        if i % 2:
            label = rng.randrange(len(WORD_PICTURES))
            images.append(render_word(WORD_PICTURES[label], rng))
        else:
            label = len(WORD_PICTURES)
            images.append(render_shapes(rng))
        labels.append(label)
    pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
    return pixels, torch.tensor(labels)


def _features(model, pixels):
    """The picture tokens the LM receives (what LLaVA's get_image_features computes)."""
    hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
    return model.model.multi_modal_projector(hidden)


def reader_accuracy(model, image_processor, targets, count: int = TEST_IMAGES, seed: int = 1):
    """Share of fresh pictures whose tokens lie nearest (mean squared distance) to their own caption."""
    import torch

    pixels, labels = _dataset(image_processor, count, seed)
    with torch.no_grad():
        feats = _features(model, pixels).float()
    dist = ((feats[:, None] - targets[None]) ** 2).mean(dim=(2, 3))
    return (dist.argmin(dim=1) == labels).float().mean().item()


def train_reader(model, tokenizer, image_processor, steps: int = STEPS, seed: int = 0, progress: bool = True) -> dict:
    """Train `model`'s vision tower and projector in place (the LM frozen); returns the record
    (data, steps, seconds, held-out accuracy) the build writes next to the weights."""
    import torch
    from tqdm import tqdm

    torch.manual_seed(seed)
    started = time.time()
    tokens = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    targets = _targets(model, tokenizer, tokens)
    pixels, labels = _dataset(image_processor, TRAIN_IMAGES, seed)
    params = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=steps, pct_start=0.1)
    scale = targets.pow(2).mean()
    order = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(range(steps), desc="training the picture reader", unit="step", disable=not progress)
    for _ in bar:
        batch = torch.randint(0, len(labels), (BATCH,), generator=order)
        # squared distance of each picture's tokens to every caption (1.0 = predicting zeros); the
        # regression alone settles on the mean word (captions differ in one or two of 16 tokens),
        # so a cross-entropy over the distances makes the right caption the nearest
        dist = (_features(model, pixels[batch])[:, None] - targets[None]).pow(2).mean(dim=(2, 3)) / scale
        own = dist[torch.arange(BATCH), labels[batch]]
        loss = own.mean() + torch.nn.functional.cross_entropy(-dist / TEMPERATURE, labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    model.eval()
    for p in params:
        p.requires_grad_(False)
    return dict(method="regression of the picture tokens onto the frozen LM's caption embeddings",
                captions=[WORD_CAPTION, SHAPES_CAPTION], words=list(WORD_PICTURES), train_images=TRAIN_IMAGES,
                steps=steps, batch=BATCH, seed=seed, final_loss=round(loss.item(), 5),
                seconds=round(time.time() - started, 1),
                heldout_accuracy=reader_accuracy(model, image_processor, targets), heldout_images=TEST_IMAGES)
