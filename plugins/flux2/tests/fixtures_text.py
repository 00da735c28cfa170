"""Tiny, real, on-disk text encoders and tokenizers for the FLUX.2 prompt-encoding tests.

Nothing can be downloaded in the test environment, so the tests build their own miniature versions of the two
FLUX.2 text stacks, in the same on-disk formats as the official repositories:

* **klein** (Qwen3): a byte-level BPE tokenizer trained here on a small corpus with the ``tokenizers``
  library, using Qwen2's pre-tokenizer (NFC, the Qwen split regex, byte level) and Qwen's added tokens
  (``<|endoftext|>`` as pad, ``<|im_start|>``, ``<|im_end|>``, ``<think>``, ``</think>``), plus a Jinja chat
  template that renders like Qwen3's for system/user/assistant turns, ``add_generation_prompt`` and
  ``enable_thinking=False`` (an empty think block). It is saved with ``save_pretrained`` as a
  ``Qwen2Tokenizer(Fast)`` folder. The encoder is a ``Qwen3ForCausalLM`` of hidden size 32 with 30 layers.
* **dev** (Mistral3): the official ``tokenizer/`` folder holds a ``PixtralProcessor``, which transformers
  only builds when torchvision is installed (it is not here). For prompt encoding the processor only
  forwards text to its tokenizer, so the fixture is the tokenizer half of that folder: a byte-level BPE
  ``PreTrainedTokenizerFast`` with Mistral's control tokens (``<s>``, ``</s>``, ``[INST]``, ``[/INST]``,
  ``[SYSTEM_PROMPT]``, ``[/SYSTEM_PROMPT]``, ``[IMG]``, ``<pad>``, ...) and a Mistral-Small-style chat
  template that accepts both string and ``[{"type": "text", ...}]`` contents. The encoder is a
  ``Mistral3ForConditionalGeneration`` whose text model has hidden size 32 and 33 layers and whose Pixtral
  vision tower is one tiny layer.

Every random weight is perturbed (RMSNorm gains far from 1) so that a swapped tensor cannot hide.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer
from torch import nn

# -- corpus ------------------------------------------------------------------------------------------------

CORPUS = [
    "a red circle on a blue background",
    "a green square next to a yellow triangle",
    "A cat holding a sign that says hello world.",
    "High resolution. A dreamy underwater portrait of a serene young woman in a flowing blue dress.",
    "Her hair floats softly around her face, strands delicately suspended in the water.",
    "Clear, shimmering light filters through, casting gentle highlights, while tiny bubbles rise around her.",
    "You are an AI that reasons about image descriptions. You give structured responses focusing on object "
    "relationships, object attribution and actions without speculation.",
    "user assistant system think photo painting of the mountains at sunset, 35mm, bokeh",
    "一只猫坐在窗台上 中文提示词 测试",
    "numbers 0123456789 and punctuation !?;:'\"()[]{}<>-_=+*/\\|@#$%^&~`",
] * 4

QWEN_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)

# -- chat templates (written for these fixtures; they render like the official ones for the features used) ---

QWEN3_CHAT_TEMPLATE = (
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

MISTRAL_CHAT_TEMPLATE = (
    "{%- macro text_of(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for block in content -%}"
    "{%- if block['type'] == 'text' -%}{{- block['text'] -}}"
    "{%- elif block['type'] in ['image', 'image_url'] -%}{{- '[IMG]' -}}"
    "{%- else -%}{{- raise_exception('Only text and image blocks are supported') -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{{- bos_token -}}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{- '[SYSTEM_PROMPT]' + text_of(messages[0]['content']) + '[/SYSTEM_PROMPT]' -}}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}{{- '[INST]' + text_of(message['content']) + '[/INST]' -}}"
    "{%- elif message['role'] == 'system' -%}"
    "{{- '[SYSTEM_PROMPT]' + text_of(message['content']) + '[/SYSTEM_PROMPT]' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- text_of(message['content']) + eos_token -}}"
    "{%- else -%}{{- raise_exception('Only user, system and assistant roles are supported') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_ADDED = ["<think>", "</think>"]
MISTRAL_SPECIAL = [
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
]  # fmt: skip


def _train_byte_bpe(special: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def build_qwen3_tokenizer(folder: Path, vocab_size: int = 400) -> int:
    """Write a tiny Qwen2-tokenizer folder with a Qwen3-like chat template; return its vocabulary size."""
    from transformers import Qwen2TokenizerFast

    tok = _train_byte_bpe(QWEN_SPECIAL, vocab_size)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_ADDED])
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
    hf.chat_template = QWEN3_CHAT_TEMPLATE
    hf.save_pretrained(folder)
    return len(hf)


def build_mistral_tokenizer(folder: Path, vocab_size: int = 400, padding_side: str = "left") -> int:
    """Write a tiny Mistral-style tokenizer folder (a PixtralProcessor's text half); return its vocab size."""
    from transformers import PreTrainedTokenizerFast

    tok = _train_byte_bpe(MISTRAL_SPECIAL, vocab_size)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side=padding_side,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = MISTRAL_CHAT_TEMPLATE
    hf.save_pretrained(folder)
    return len(hf)


# -- encoders ----------------------------------------------------------------------------------------------


@torch.no_grad()
def perturb_(model: nn.Module, seed: int) -> None:
    """Make every weight distinctive: RMSNorm gains ~ U(0.5, 1.5), other tensors rescaled by 1.5."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name and param.ndim == 1:
            param.copy_(0.5 + torch.rand(param.shape, generator=gen))
        else:
            param.copy_(torch.randn(param.shape, generator=gen) * 0.08)


def tiny_qwen3_config(vocab_size: int, tie: bool = True) -> Any:
    """A 30-layer Qwen3 config (hidden 32, 2 heads of 16, 1 KV head): layers 9/18/27 exist, 28-29 unused."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=30,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        tie_word_embeddings=tie,
        bos_token_id=None,
        eos_token_id=2,
        pad_token_id=0,
    )


def tiny_mistral3_config(vocab_size: int, image_token_index: int) -> Any:
    """A Mistral3 config: 33-layer text model (hidden 32, layers 10/20/30 exist), one-layer Pixtral tower."""
    from transformers import Mistral3Config

    text = {
        "model_type": "mistral",
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 33,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1_000_000_000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
    }
    vision = {
        "model_type": "pixtral",
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "head_dim": 8,
        "image_size": 64,
        "patch_size": 16,
        "num_channels": 3,
    }
    return Mistral3Config(
        text_config=text,
        vision_config=vision,
        image_token_index=image_token_index,
        spatial_merge_size=2,
        vision_feature_layer=-1,
        multimodal_projector_bias=False,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


def _save_sharded(state: dict[str, torch.Tensor], folder: Path, shards: int, stem: str = "model") -> None:
    """Save ``state`` as ``shards`` safetensors files plus a ``*.safetensors.index.json`` (HF naming)."""
    names = sorted(state)
    per = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        file = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {n: state[n].contiguous() for n in names[i * per : (i + 1) * per]}
        save_file(chunk, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_text_encoder(
    model: nn.Module, folder: Path, state: dict[str, torch.Tensor] | None = None, shards: int = 1
) -> None:
    """Write ``config.json`` and the weights (one file or ``shards`` shards with an index) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]  # type: ignore[union-attr]
    model.config.save_pretrained(folder)  # type: ignore[operator, union-attr]
    if state is None:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if shards == 1:
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})  # fmt: skip
    else:
        _save_sharded(state, folder, shards)


def legacy_mistral3_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a transformers-5 Mistral3 state dict to the layout of transformers < 4.52.

    ``model.language_model.*`` -> ``language_model.model.*``, ``lm_head.*`` -> ``language_model.lm_head.*``,
    ``model.vision_tower.*`` -> ``vision_tower.*``, ``model.multi_modal_projector.*`` ->
    ``multi_modal_projector.*``.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("model.language_model."):
            new = "language_model.model." + key[len("model.language_model.") :]
        elif key.startswith("lm_head."):
            new = "language_model." + key
        elif key.startswith("model."):
            new = key[len("model.") :]
        else:
            new = key
        out[new] = value
    return out


def build_qwen3_encoder(
    folder: Path, vocab_size: int, seed: int = 0, shards: int = 1, tie: bool = True
) -> Any:
    """Create, perturb and save a tiny ``Qwen3ForCausalLM``; return the in-memory model (fp32, eval)."""
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(tiny_qwen3_config(vocab_size, tie=tie)).eval()
    perturb_(model, seed)
    if tie:
        model.tie_weights()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if tie:
        state.pop("lm_head.weight", None)  # tied, as the official klein-4B files store it
    save_text_encoder(model, folder, state, shards=shards)
    return model


def build_mistral3_encoder(
    folder: Path,
    vocab_size: int,
    image_token_index: int,
    seed: int = 1,
    shards: int = 1,
    legacy: bool = False,
) -> Any:
    """Create, perturb and save a tiny ``Mistral3ForConditionalGeneration``; return the in-memory model."""
    from transformers import Mistral3ForConditionalGeneration

    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(tiny_mistral3_config(vocab_size, image_token_index)).eval()
    perturb_(model, seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if legacy:
        state = legacy_mistral3_state(state)
    save_text_encoder(model, folder, state, shards=shards)
    return model
