"""The EliGen unit of ``FluxImagePipeline``: entity prompts as extra text tokens plus the regional mask.

``eligen_prepare`` runs per CFG branch after the family's prompt encoding and extensions. On the positive branch
(and on the negative one with ``eligen_enable_on_negative=True``) it encodes every entity prompt with the
pipeline's T5 encoder, appends their tokens to the branch's ``extra_txt`` (after the global prompt), builds the
regional mask (:func:`diffstudio_eligen.mask.regional_mask`) into ``attention_kwargs`` and installs the
regional attention processor in every DiT block (it is plain SDPA for calls without a mask). With
``eligen_enable_inpaint=True`` and an ``input_image``, the union of the entity masks becomes the inpainting mask:
only the entities' regions are repainted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from diffstudio.errors import PipelineInputError
from diffstudio.nn import DEFAULT_PROCESSOR
from diffstudio.pipeline.base import BasePipeline
from diffstudio.pipeline.units import InputParam, OutputParam, PipelineUnit
from PIL import Image
from torch import Tensor

from diffstudio_eligen.mask import MASK_KEY, RegionalAttentionProcessor, regional_mask

PROCESSOR = RegionalAttentionProcessor()


def entity_regions(masks: Sequence[Any], grid: tuple[int, int], count: int) -> Tensor:
    """Entity masks (single-channel PIL images, white = the entity) -> ``(1, N, h*w)`` booleans on the token grid.

    A token is inside when the mask, resized to the ``h x w`` token grid with a box filter, is at least half white.

    Raises:
        PipelineInputError: Not a list, a count that differs from the prompts', a non-image or a multi-channel mask.
    """
    if not isinstance(masks, (list, tuple)):
        raise PipelineInputError(f"eligen_entity_masks must be a list of PIL masks, got {type(masks).__name__}")
    if len(masks) != count:
        raise PipelineInputError(
            f"eligen_entity_masks has {len(masks)} masks for {count} eligen_entity_prompts; give one mask per entity"
        )
    h, w = grid
    rows = []
    for i, mask in enumerate(masks):
        if not isinstance(mask, Image.Image):
            raise PipelineInputError(f"eligen_entity_masks[{i}] must be a PIL image, got {type(mask).__name__}")
        if mask.mode not in ("L", "1"):
            raise PipelineInputError(
                f"eligen_entity_masks[{i}] has mode {mask.mode!r} ({len(mask.getbands())} channels); masks must be "
                "single-channel: use mask.convert('L') (white = the entity's region)"
            )
        small = np.asarray(mask.convert("L").resize((w, h), Image.Resampling.BOX), dtype=np.float32) / 255.0
        rows.append(torch.from_numpy(small >= 0.5).flatten())
    return torch.stack(rows)[None]


def _with_regional(processor: Any, block: str) -> Any:
    """``processor`` with the plain SDPA at the bottom of its wrapper chain replaced by the regional one.

    Wrapping processors (the FLUX.1 family's convention: ``inner`` and ``with_inner``, e.g. the IP-Adapter's) keep
    wrapping; a processor that neither is SDPA nor wraps one cannot apply the mask, which is an error rather
    than a silently ignored entity layout.
    """
    if processor is DEFAULT_PROCESSOR or isinstance(processor, RegionalAttentionProcessor):
        return PROCESSOR if processor is DEFAULT_PROCESSOR else processor
    inner = getattr(processor, "inner", None)
    if inner is not None and callable(getattr(processor, "with_inner", None)):
        replaced = _with_regional(inner, block)
        return processor if replaced is inner else processor.with_inner(replaced)
    raise PipelineInputError(
        f"EliGen needs its regional attention in DiT block {block}, which has the attention processor "
        f"{processor!r}; it neither is plain SDPA nor wraps another processor (attribute 'inner' and method "
        "'with_inner'), so the entity masks could not apply there. Reset it with dit.set_attn_processor(...)."
    )


def install_processor(dit: Any) -> None:
    """Give every block the regional processor (inside the wrappers other adapters installed)."""
    for block, processor in dit.attn_processors.items():
        replaced = _with_regional(processor, block)
        if replaced is not processor:
            dit.set_attn_processor(replaced, [block])


class EliGenBranches(PipelineUnit):
    """Decide which CFG branches get the entities (``negative_eligen_entity_prompts``)."""

    name = "eligen_branches"
    description = (
        "Checks the EliGen arguments; with eligen_enable_on_negative copies the entity prompts to the negative "
        "branch (negative_eligen_entity_prompts), which otherwise has none."
    )
    before = ("eligen_prepare",)
    inputs = (
        InputParam("eligen_entity_prompts", "list of N entity prompts"),
        InputParam("eligen_entity_masks", "list of N single-channel PIL masks"),
        InputParam("eligen_enable_on_negative", "also apply the entities on the negative CFG branch"),
    )
    outputs = (OutputParam("negative_eligen_entity_prompts", "the negative branch's entity prompts", optional=True),)

    def process(self, pipe: BasePipeline, **inputs: Any) -> Mapping[str, Any]:
        if inputs["eligen_entity_prompts"] is None:
            if inputs["eligen_entity_masks"] is not None:
                raise PipelineInputError("eligen_entity_masks were given without eligen_entity_prompts")
            return {}
        if inputs["eligen_enable_on_negative"]:
            return {"negative_eligen_entity_prompts": inputs["eligen_entity_prompts"]}
        return {}


class EliGenPrepare(PipelineUnit):
    """Entity prompts, regional mask and processor, per CFG branch."""

    name = "eligen_prepare"
    description = (
        "Encodes eligen_entity_prompts (T5) into extra_txt after the global prompt, builds the regional additive "
        "mask (B, 1, L, L) into attention_kwargs and installs the masked attention processor in every block."
    )
    components = ("text_encoder_2", "dit")
    optional_components = ("text_encoder_2",)
    per_branch = True
    after = ("flux1_encode_prompt", "flux1_extensions", "flux1_kontext", "flux1_image_ids")
    inputs = (
        InputParam("eligen_entity_prompts", "list of N entity prompts", per_branch=True),
        InputParam("eligen_entity_masks", "list of N single-channel PIL masks (white = the entity)"),
        InputParam(
            "prompt_emb", "(B, L, 4096) the branch's T5 tokens", True, per_branch=True, negative_name="prompt_emb"
        ),
        InputParam("extra_txt", "extra text tokens set by earlier units", per_branch=True, negative_name="extra_txt"),
        InputParam(
            "attention_kwargs", "attention extras of the branch", per_branch=True, negative_name="attention_kwargs"
        ),
        InputParam("t5_sequence_length", "T5 tokens per prompt"),
        InputParam("kontext_latents", "(1, L_ref, 64) reference tokens"),
        InputParam("height", "image height", True),
        InputParam("width", "image width", True),
    )
    outputs = (
        OutputParam("extra_txt", "extra text tokens with the entity prompts appended", optional=True),
        OutputParam("attention_kwargs", f"attention extras with {MASK_KEY!r}", optional=True),
    )

    def process(self, pipe: BasePipeline, **inputs: Any) -> Mapping[str, Any]:
        prompts = inputs["eligen_entity_prompts"]
        if prompts is None:
            return {}
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise PipelineInputError("eligen_entity_prompts must be a list of strings (one per entity)")
        if inputs["eligen_entity_masks"] is None:
            raise PipelineInputError("eligen_entity_prompts need eligen_entity_masks (one single-channel mask each)")
        flux: Any = pipe
        grid = flux.latent_grid(inputs["height"], inputs["width"])
        regions = entity_regions(inputs["eligen_entity_masks"], grid, len(prompts))
        encoded = flux.prompt_encoder().encode(list(prompts), int(inputs["t5_sequence_length"] or 512))
        entities = encoded.txt.to(pipe.device, pipe.torch_dtype)  # (N, L_e, 4096)
        prompt_emb, extra = inputs["prompt_emb"], inputs["extra_txt"]
        batch = prompt_emb.shape[0]
        tokens = entities.reshape(1, -1, entities.shape[-1]).expand(batch, -1, -1)
        global_len = prompt_emb.shape[1] + (0 if extra is None else extra.shape[1])
        kontext = inputs["kontext_latents"]
        ref_len = 0 if kontext is None else int(kontext.shape[1])
        mask = regional_mask(global_len, [entities.shape[1]] * len(prompts), regions.expand(batch, -1, -1), ref_len)
        new_extra = tokens if extra is None else torch.cat([extra.expand(batch, -1, -1), tokens.to(extra)], dim=1)
        install_processor(pipe.dit)
        extras = {**(inputs["attention_kwargs"] or {}), MASK_KEY: mask.to(pipe.device)}
        return {"extra_txt": new_extra, "attention_kwargs": extras}


class EliGenInpaint(PipelineUnit):
    """``eligen_enable_inpaint``: repaint only inside the entity masks (their union is the inpainting mask)."""

    name = "eligen_inpaint"
    description = "With eligen_enable_inpaint and input_image, sets inpaint_mask (1, L, 1) to the union of the masks."
    after = ("flux1_inpaint_mask",)
    inputs = (
        InputParam("eligen_enable_inpaint", "repaint only the entity regions of input_image"),
        InputParam("eligen_entity_masks", "list of N single-channel PIL masks"),
        InputParam("input_image", "the image being edited"),
        InputParam("height", "image height", True),
        InputParam("width", "image width", True),
    )
    outputs = (OutputParam("inpaint_mask", "(1, L, 1) union of the entity masks", optional=True),)

    def process(self, pipe: BasePipeline, **inputs: Any) -> Mapping[str, Any]:
        if not inputs["eligen_enable_inpaint"]:
            return {}
        if inputs["input_image"] is None:
            raise PipelineInputError("eligen_enable_inpaint needs input_image (the picture whose entities are redrawn)")
        masks = inputs["eligen_entity_masks"]
        if masks is None:
            raise PipelineInputError("eligen_enable_inpaint needs eligen_entity_masks")
        flux: Any = pipe
        regions = entity_regions(masks, flux.latent_grid(inputs["height"], inputs["width"]), len(masks))
        union = regions.any(dim=1).to(pipe.torch_dtype)  # (1, L)
        return {"inpaint_mask": union[..., None].to(pipe.device)}
