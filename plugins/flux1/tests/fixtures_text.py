"""Tiny, real, on-disk CLIP and T5 text encoders and tokenizers for the FLUX.1 prompt-encoding tests.

Nothing can be downloaded in the test environment, so the tests train miniature tokenizers here with the
``tokenizers`` library and save them as transformers folders, like the official ``tokenizer/`` (CLIP:
byte-level BPE with ``</w>`` word ends, ``<|startoftext|>`` / ``<|endoftext|>`` around every prompt,
``<|endoftext|>`` as padding, 77 tokens) and ``tokenizer_2/`` (T5: a Unigram model with a metaspace
pre-tokenizer, ``</s>`` appended, ``<pad>`` padding). The encoders are a 2-layer ``CLIPTextModel`` and a
2-layer ``T5EncoderModel`` with perturbed weights, saved with ``config.json`` in the official key layouts:
CLIP in the legacy ``text_model.*`` layout (as FLUX.1's ``text_encoder/model.safetensors``) or the
transformers-5 layout, T5 sharded with an index and without the tied ``encoder.embed_tokens.weight``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer, UnigramTrainer
from torch import nn

CORPUS = [
    "a red circle on a blue background",
    "a green square next to a yellow triangle",
    "A cat holding a sign that says hello world.",
    "High resolution. A dreamy underwater portrait of a serene young woman in a flowing blue dress.",
    "CG, masterpiece, best quality, solo, long hair, wavy hair, silver hair, blue eyes",
    "numbers 0123456789 and punctuation !?;:'\"()[]{}<>-_=+*/",
] * 4
CLIP_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
CLIP_HIDDEN, T5_HIDDEN = 20, 24


def build_clip_tokenizer(folder: Path, vocab_size: int = 300) -> int:
    """Write a tiny CLIP tokenizer folder; return its vocabulary size (bos 0, eos = pad 1)."""
    from transformers import CLIPTokenizerFast

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        pair="<|startoftext|> $A <|endoftext|> $B <|endoftext|>",
        special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)],
    )
    hf = CLIPTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=77,
    )
    hf.save_pretrained(folder)
    return len(hf)


def build_t5_tokenizer(folder: Path, vocab_size: int = 120) -> int:
    """Write a tiny T5 tokenizer folder; return its vocabulary size (pad 0, eos 1, unk 2)."""
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    hf = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)
    hf.save_pretrained(folder)
    return len(hf)


@torch.no_grad()
def perturb_(model: nn.Module, seed: int) -> None:
    """Make every weight distinctive: norm gains ~ U(0.5, 1.5), other tensors N(0, 0.1^2)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name and param.ndim == 1 and name.endswith("weight"):
            param.copy_(0.5 + torch.rand(param.shape, generator=gen))
        else:
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def _save(state: dict[str, torch.Tensor], folder: Path, shards: int) -> None:
    names = sorted(state)
    if shards == 1:
        save_file({n: state[n].contiguous() for n in names}, str(folder / "model.safetensors"), {"format": "pt"})
        return
    per = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {n: state[n].contiguous() for n in names[i * per : (i + 1) * per]}
        save_file(chunk, str(folder / file), {"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, file))
    index = {"metadata": {"total_size": sum(t.numel() * 4 for t in state.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def build_clip_encoder(folder: Path, vocab: int, seed: int = 0, legacy: bool = True) -> Any:
    """Create, perturb and save a tiny ``CLIPTextModel`` (77 positions); return the in-memory model."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=CLIP_HIDDEN, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=CLIP_HIDDEN,
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="quick_gelu",
    )  # fmt: skip
    model = CLIPTextModel(config).eval()
    perturb_(model, seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.architectures = ["CLIPTextModel"]
    model.config.save_pretrained(folder)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if legacy:
        state = {f"text_model.{k}": v for k, v in state.items()}
    _save(state, folder, 1)
    return model


def build_t5_encoder(folder: Path, vocab: int, seed: int = 1, shards: int = 2) -> Any:
    """Create, perturb and save a tiny ``T5EncoderModel`` (sharded, tied embedding stored once)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab, d_model=T5_HIDDEN, d_kv=12, d_ff=48, num_layers=2, num_heads=2,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, relative_attention_max_distance=16,
        is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False,
    )  # fmt: skip
    model = T5EncoderModel(config).eval()
    perturb_(model, seed)
    model.encoder.embed_tokens = model.shared
    folder.mkdir(parents=True, exist_ok=True)
    model.config.architectures = ["T5EncoderModel"]
    model.config.save_pretrained(folder)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    _save(state, folder, shards)
    return model
