"""The LoRA-encoder unit of ``FluxImagePipeline``: one T5-space token per LoRA, appended to the positive prompt.

``lora_encoder_encode`` runs per CFG branch after the prompt encoding and the family's extensions (and before
EliGen, whose mask counts the text tokens). On the positive branch it encodes every LoRA of
``lora_encoder_inputs`` (:mod:`diffstudio_lora_encoder.inputs`), multiplies the tokens by ``lora_encoder_scale``
and appends them to the branch's ``extra_txt`` (ids zero, as every FLUX.1 text token). The negative branch reads
``negative_lora_encoder_inputs``, which nothing sets, so it gets no token (as in DiffSynth). The unit runs under
the caller's grad mode, so ``diffstudio train --trainable_models lora_encoder`` trains the encoder through it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffstudio.errors import PipelineInputError
from diffstudio.pipeline.base import BasePipeline
from diffstudio.pipeline.units import InputParam, OutputParam, PipelineUnit
from torch import Tensor

from diffstudio_lora_encoder.inputs import as_sources, encoder_pairs
from diffstudio_lora_encoder.model import FluxLoraEncoder


def encode_loras(encoder: FluxLoraEncoder, runtime: Any, sources: Any, scale: float = 1.0,
                 missing: str = "error") -> Tensor:  # fmt: skip
    """LoRA sources (one or a list) -> ``(1, n_loras * S, D)`` tokens times ``scale`` (encoder dtype/device)."""
    pairs = encoder_pairs(encoder, runtime, as_sources(sources), missing)
    tokens = torch.cat([encoder(p) for p in pairs], dim=1)
    return tokens * scale


class LoraEncode(PipelineUnit):
    """Encode ``lora_encoder_inputs`` into extra text tokens of the positive branch."""

    name = "lora_encoder_encode"
    description = (
        "Encodes each LoRA of lora_encoder_inputs (any FLUX.1 layout) into one T5-space token (1, n, 4096), times "
        "lora_encoder_scale, appended to the positive branch's extra_txt."
    )
    components = ("lora_encoder",)
    optional_components = ("lora_encoder",)
    per_branch = True
    after = ("flux1_encode_prompt", "flux1_extensions", "flux1_kontext")
    before = ("eligen_prepare",)
    inputs = (
        InputParam("lora_encoder_inputs", "LoRA file(s): path, ModelConfig, state dict, or a list", per_branch=True),
        InputParam("lora_encoder_scale", "multiplier of the LoRA tokens (1.0)"),
        InputParam("lora_encoder_missing", "'error' (default) or 'zero' for LoRAs lacking encoder layers"),
        InputParam(
            "prompt_emb", "(B, L, 4096) the branch's T5 tokens", True, per_branch=True, negative_name="prompt_emb"
        ),
        InputParam("extra_txt", "extra text tokens set by earlier units", per_branch=True, negative_name="extra_txt"),
        InputParam("extra_txt_ids", "their ids, when set", per_branch=True, negative_name="extra_txt_ids"),
    )
    outputs = (
        OutputParam("extra_txt", "extra text tokens with one token per LoRA appended", optional=True),
        OutputParam("extra_txt_ids", "their ids (zeros appended), when earlier units set ids", optional=True),
    )

    def process(self, pipe: BasePipeline, **inputs: Any) -> Mapping[str, Any]:
        sources = inputs["lora_encoder_inputs"]
        if sources is None:
            return {}
        if not pipe.has("lora_encoder"):
            raise PipelineInputError(
                "lora_encoder_inputs were given but no LoRA encoder is loaded; add ModelConfig("
                "model_id='DiffSynth-Studio/LoRA-Encoder-FLUX.1-Dev', origin_file_pattern='model.safetensors') to "
                "from_pretrained"
            )
        scale = inputs["lora_encoder_scale"]
        scale = 1.0 if scale is None else scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise PipelineInputError(f"lora_encoder_scale={scale!r} must be a number (1.0 is the default)")
        encoder: FluxLoraEncoder = getattr(pipe, "lora_encoder")  # noqa: B009 (a slot, served by __getattr__)
        prompt_emb, extra, ids = inputs["prompt_emb"], inputs["extra_txt"], inputs["extra_txt_ids"]
        if encoder.params.embed_dim != prompt_emb.shape[-1]:
            raise PipelineInputError(
                f"the LoRA encoder makes {encoder.params.embed_dim}-wide tokens but the prompt's are "
                f"{prompt_emb.shape[-1]} wide; use the encoder made for this model's T5"
            )
        missing = inputs["lora_encoder_missing"] or "error"
        tokens = encode_loras(encoder, pipe.runtime, sources, float(scale), missing).to(prompt_emb.device)
        batch = max(prompt_emb.shape[0], 1 if extra is None else extra.shape[0])
        tokens = tokens.to(prompt_emb.dtype).expand(batch, -1, -1)
        out: dict[str, Any] = {
            "extra_txt": tokens if extra is None else torch.cat([extra.expand(batch, -1, -1), tokens.to(extra)], 1)
        }
        if ids is not None:  # (L, A) or (B, L, A): zero ids for the new tokens
            zeros = ids.new_zeros(*ids.shape[:-2], tokens.shape[1], ids.shape[-1])
            out["extra_txt_ids"] = torch.cat([ids, zeros], dim=-2)
        return out
