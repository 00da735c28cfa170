"""``nexus_gen_prompt``: the AR model's embeddings, through the decoder's head, replace the positive text stream.

Runs per CFG branch after the family's prompt encoding. On the positive branch, when the ``nexus_gen`` slot holds
the AR model, each prompt goes through one prefilled forward (:mod:`diffstudio_nexus_gen.ar`):

* generation (no ``nexus_gen_reference_image``; the ``nexus_gen_decoder`` slot holds the adapter): ``txt =
  adapter(target) (B, 81, 4096)`` with zero ids;
* editing (a reference image; the slot holds the merger): ``txt = merger([target | reference]) (B, 81 + N_ref,
  4096)`` with the published RoPE text ids (:func:`~diffstudio_nexus_gen.heads.editing_text_ids`).

It writes them as the branch's ``text_stream`` (:class:`diffstudio.dit.TextStream`), the DiT contract's key for
replacing the text stream per call. The negative branch keeps T5 of the negative prompt. The pooled CLIP vector is
CLIP(prompt), as DiffSynth-Studio computes it; ``nexus_gen_pooled_prompt="empty"`` uses CLIP("") instead, as the
Nexus-Gen repository's own pipeline does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffstudio.dit.extensions import TextStream
from diffstudio.errors import PipelineInputError
from diffstudio.pipeline.base import BasePipeline
from diffstudio.pipeline.units import InputParam, OutputParam, PipelineUnit
from PIL import Image
from torch import Tensor

from diffstudio_nexus_gen.heads import EditingHead, GenerationHead, editing_text_ids
from diffstudio_nexus_gen.loaders import AR_SLOT, HEAD_SLOT

POOLED_CHOICES = ("prompt", "empty")


def check_reference(value: Any) -> Image.Image | None:
    """``nexus_gen_reference_image`` as an RGB PIL image (None passes).

    Raises:
        PipelineInputError: It is not a PIL image.
    """
    if value is None:
        return None
    if not isinstance(value, Image.Image):
        raise PipelineInputError(
            f"nexus_gen_reference_image must be a PIL image, got {type(value).__name__}; open it with PIL.Image.open"
        )
    return value.convert("RGB")


def nexus_gen_stream(
    pipe: BasePipeline, prompts: Sequence[str], reference: Image.Image | None, height: int, width: int
) -> tuple[Tensor, Tensor]:
    """The replacement text tokens ``(B, L, 4096)`` and their ids ``(B, L, 3)`` for ``prompts``.

    Raises:
        PipelineInputError: The AR model or the matching decoder head is not loaded.
    """
    if not pipe.has(AR_SLOT):
        raise PipelineInputError(
            "nexus_gen_reference_image was given but the Nexus-Gen AR model is not loaded; add "
            "ModelConfig(model_id='DiffSynth-Studio/Nexus-GenV2', origin_file_pattern='model*.safetensors')"
        )
    head = getattr(pipe, HEAD_SLOT) if pipe.has(HEAD_SLOT) else None
    wanted = EditingHead if reference is not None else GenerationHead
    if not isinstance(head, wanted):
        have = (
            "no decoder"
            if head is None
            else f"the {'editing' if isinstance(head, EditingHead) else 'generation'} decoder"
        )
        need = "edit_decoder" if reference is not None else "generation_decoder"
        raise PipelineInputError(
            f"Nexus-Gen {'editing (nexus_gen_reference_image given)' if reference is not None else 'generation'} needs "
            f"the {need} (diffstudio_nexus_gen.load_decoder(pipe, '{need}.bin', allow_pickle=True)); {have} is loaded"
        )
    ar: Any = getattr(pipe, AR_SLOT)
    outputs = [ar(prompt, reference) for prompt in prompts]
    device, dtype = pipe.device, pipe.torch_dtype
    target = torch.stack([o.target for o in outputs]).to(device)
    if reference is None:
        txt = head(target.to(_dtype_of(head, dtype)))
        ids = torch.zeros(txt.shape[0], txt.shape[1], 3, device=device)
        return txt.to(device, dtype), ids
    first = outputs[0]
    assert first.reference is not None
    grids = first.grids.tolist()
    ref = torch.stack([o.reference for o in outputs if o.reference is not None]).to(device)
    work = _dtype_of(head, dtype)
    txt = head(target.to(work), grids[-1], ref.to(work), grids[0])
    rows, cols = pipe.latent_grid(height, width)  # FLUX tokens; the VAE latent is twice as large
    ids = editing_text_ids((2 * rows, 2 * cols), grids[-1], grids[0], txt.shape[0]).to(device)
    return txt.to(device, dtype), ids


def _dtype_of(module: Any, fallback: torch.dtype) -> torch.dtype:
    for p in module.parameters():
        return p.dtype if p.dtype.is_floating_point and not p.is_meta else fallback
    return fallback


class NexusGenPrompt(PipelineUnit):
    """Replace the positive branch's text stream with Nexus-Gen's embeddings."""

    name = "nexus_gen_prompt"
    description = (
        "Runs the Nexus-Gen AR model (one prefilled Qwen2.5-VL forward per prompt) and the decoder head (adapter or "
        "embedding merger) into the positive branch's text_stream: txt (B, 81 [+ N_ref], 4096) with zero or RoPE ids."
    )
    components = (AR_SLOT, HEAD_SLOT, "text_encoder")
    optional_components = (AR_SLOT, HEAD_SLOT, "text_encoder")
    per_branch = True
    after = ("flux1_encode_prompt", "flux1_extensions", "flux1_image_ids")
    inputs = (
        InputParam("prompt", "list of B prompts (the instruction when editing)", True, per_branch=True),
        InputParam("branch", "the CFG branch of this run", per_branch=True, negative_name="branch"),
        InputParam("nexus_gen_reference_image", "PIL image to edit (editing decoder); None generates"),
        InputParam("nexus_gen_pooled_prompt", "'prompt' (CLIP of the prompt, DiffSynth) or 'empty' (CLIP of '')"),
        InputParam("height", "image height", True),
        InputParam("width", "image width", True),
    )
    outputs = (OutputParam("text_stream", "TextStream(txt, txt_ids, y) replacing the T5 tokens", optional=True),)

    def process(self, pipe: BasePipeline, **inputs: Any) -> Mapping[str, Any]:
        reference = check_reference(inputs["nexus_gen_reference_image"])
        pooled = inputs["nexus_gen_pooled_prompt"] or "prompt"
        if pooled not in POOLED_CHOICES:
            raise PipelineInputError(f"nexus_gen_pooled_prompt={pooled!r}; use one of {POOLED_CHOICES}")
        if not pipe.has(AR_SLOT) and reference is None:
            return {}  # no Nexus-Gen model loaded: an ordinary FLUX.1 call
        if inputs["branch"] == "negative":
            return {}
        prompts = list(inputs["prompt"])
        txt, ids = nexus_gen_stream(pipe, prompts, reference, int(inputs["height"]), int(inputs["width"]))
        y = None
        if pooled == "empty":
            encoder: Any = pipe
            y = encoder.prompt_encoder().pooled([""] * len(prompts)).to(pipe.device, pipe.torch_dtype)
        return {"text_stream": TextStream(txt, ids, y)}
