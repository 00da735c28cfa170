"""Stage ``text``: the shapes model's tokenizer and its frozen, randomly initialised Qwen3 text encoder.

The tokenizer is a byte-level BPE (Qwen2's pre-tokenizer: NFC, Qwen's split regex, byte level) trained on the
caption vocabulary, with Qwen's special tokens and a chat template that renders like Qwen3's (one user turn,
the assistant header, an empty think block when ``enable_thinking=False``). Any text still tokenizes (bytes).
The encoder is a ``Qwen3ForCausalLM`` with tied embeddings, frozen at a seeded random initialisation (token
embeddings at unit scale): its hidden states 9, 18 and 27 carry the caption's words well enough for the DiT to
read them, so it needs no training. Both are saved with ``save_pretrained``, the layout of an official
``tokenizer/`` and ``text_encoder/`` folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffstudio_shapes.data import ALL_SHAPES, PALETTE, all_captions, caption
from diffstudio_shapes.recipe.sizes import TEXT

SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK_TOKENS = ["<think>", "</think>"]
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set text = message['content'] | map(attribute='text') | join('') -%}{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + text + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)
EXTRA_WORDS = "a an the of on in at with and shape picture image photo bright dark light style colour color"


def corpus() -> list[str]:
    """Every caption the data set can produce (both splits, all shapes), the palette words and a few more."""
    texts = [caption(parts) for split in ("train", "heldout") for parts in all_captions(ALL_SHAPES, split)]
    texts.append(" ".join(PALETTE))
    texts.append(EXTRA_WORDS)
    texts.append("user assistant system")
    return texts


def build_tokenizer(folder: Path) -> int:
    """Train and save the tokenizer folder; return its vocabulary size (at most ``TEXT.vocab_size``)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.trainers import BpeTrainer
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=TEXT.vocab_size - len(THINK_TOKENS),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    hf = Qwen2TokenizerFast(
        tokenizer_object=tok,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        errors="replace",
        split_special_tokens=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    folder.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(folder)
    return len(hf)


def build_text_encoder(folder: Path, vocab_size: int, seed: int = 0) -> None:
    """Save a seeded random ``Qwen3ForCausalLM`` (tied embeddings) as ``config.json`` + ``model.safetensors``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=TEXT.hidden_size,
        intermediate_size=TEXT.intermediate_size,
        num_hidden_layers=TEXT.num_hidden_layers,
        num_attention_heads=TEXT.num_attention_heads,
        num_key_value_heads=TEXT.num_key_value_heads,
        head_dim=TEXT.head_dim,
        max_position_embeddings=512,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        initializer_range=TEXT.init_std,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # token embeddings at unit scale (see TextSizes); the LM head is tied to them
        model.model.embed_tokens.weight.normal_(0.0, TEXT.embed_std)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)


def build_text(root: Path, seed: int = 0) -> dict[str, int]:
    """Run the stage unless both folders exist; return ``{"vocab_size": ...}``."""
    tokenizer, encoder = root / "tokenizer", root / "text_encoder"
    if (tokenizer / "tokenizer.json").exists() and (encoder / "model.safetensors").exists():
        print(f"{tokenizer} and {encoder} exist; skipping the text stage")
        return {"vocab_size": int(json.loads((encoder / "config.json").read_text())["vocab_size"])}
    vocab = build_tokenizer(tokenizer)
    build_text_encoder(encoder, vocab, seed)
    return {"vocab_size": vocab}
