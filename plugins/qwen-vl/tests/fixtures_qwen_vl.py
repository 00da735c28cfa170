"""A tiny, real Qwen2.5-VL on disk: a trained byte-level BPE tokenizer, the image processor and the chat template.

Nothing can be downloaded here, so the fixture builds a miniature of ``Qwen/Qwen2.5-VL-7B-Instruct`` in its
on-disk layout: ``config.json`` + ``model.safetensors`` (in the layout asked for: ``legacy`` = pre-4.52
``model.layers.*`` / ``visual.*`` / ``lm_head``, or ``transformers5`` = ``model.language_model.*`` /
``model.visual.*``) and the processor files (``tokenizer.json``, ``tokenizer_config.json``,
``preprocessor_config.json`` with ``processor_class`` ``Qwen2_5_VLProcessor``, ``chat_template.jinja``). The chat
template is Qwen2-VL's (``add_vision_id`` numbers pictures). Weights are random and perturbed (RMSNorm gains far
from 1) so that a swapped tensor cannot hide.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers.trainers import BpeTrainer

SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
]  # fmt: skip

CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "Given a user prompt, generate an Enhanced prompt that provides detailed visual descriptions.",
    "add more flowers to the garden, make the sky blue, remove the car",
    'a red circle on a blue background; the sign says "hello world"',
    "Picture 1: describe the image in detail. Here is the image: Generate an image",
    "system user assistant You are a helpful assistant.",
] * 4

SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
MIN_PIXELS, MAX_PIXELS = 4 * 28 * 28, 16 * 28 * 28


def build_processor(folder: Path, vocab_size: int = 320) -> dict[str, int]:
    """Write the processor folder; return the special-token ids the model config needs."""
    from transformers import Qwen2TokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)  # fmt: skip
    tok.train_from_iterator(CORPUS, trainer=trainer)
    hf = Qwen2TokenizerFast(
        tokenizer_object=tok, unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        model_max_length=32768, clean_up_tokenization_spaces=False, errors="replace", split_special_tokens=False,
    )  # fmt: skip
    hf.chat_template = CHAT_TEMPLATE
    folder.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    for name in ("preprocessor_config.json", "tokenizer_config.json"):
        data = json.loads((folder / name).read_text())
        data["processor_class"] = "Qwen2_5_VLProcessor"
        (folder / name).write_text(json.dumps(data, indent=2))
    ids = {t: hf.convert_tokens_to_ids(t) for t in SPECIAL}
    return {
        "vocab_size": len(hf),
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "eos_token_id": ids["<|im_end|>"],
    }


def tiny_config(tokens: dict[str, int], hidden: int = 32, layers: int = 2) -> Any:
    """A ``Qwen2_5_VLConfig`` of hidden size ``hidden``: heads of 16 (GQA 2:1), mrope (2, 3, 3), 2 vision blocks."""
    from transformers import Qwen2_5_VLConfig

    text = {
        "vocab_size": tokens["vocab_size"], "hidden_size": hidden, "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers, "num_attention_heads": hidden // 16, "num_key_value_heads": hidden // 32,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    }  # fmt: skip
    vision = {
        "depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "out_hidden_size": hidden,
        "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
        "fullatt_block_indexes": [1], "in_channels": 3,
    }  # fmt: skip
    extra = {k: v for k, v in tokens.items() if k != "vocab_size"}
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **extra)


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Make every weight distinctive: norm gains ~ U(0.5, 1.5), other tensors N(0, 0.08^2)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name or "ln_q" in name:
            param.copy_(0.5 + torch.rand(param.shape, generator=gen))
        else:
            param.copy_(torch.randn(param.shape, generator=gen) * 0.08)


def build_model(folder: Path, tokens: dict[str, int], layout: str = "legacy", seed: int = 0,
                dtype: torch.dtype = torch.float32, hidden: int = 32, layers: int = 2) -> Any:  # fmt: skip
    """Write ``config.json`` + ``model.safetensors`` of a tiny ``Qwen2_5_VLForConditionalGeneration``; return it."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config(tokens, hidden, layers)).eval()
    perturb_(model, seed)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    if layout == "legacy":
        renamed = {}
        for key, value in state.items():
            if key.startswith("model.visual."):
                renamed[key.removeprefix("model.")] = value
            elif key.startswith("model.language_model."):
                renamed["model." + key.removeprefix("model.language_model.")] = value
            else:
                renamed[key] = value
        state = renamed
    elif layout != "transformers5":
        raise ValueError(layout)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"))
    model.config.save_pretrained(folder)
    return model
