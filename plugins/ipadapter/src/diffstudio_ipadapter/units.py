"""The IP-Adapter unit of ``FluxImagePipeline``, its attention processor and (XLabs) block residual.

``ipadapter_prepare`` (per CFG branch) encodes ``ipadapter_images`` once with the image encoder (SigLIP pooled
output for InstantX, CLIP ``image_embeds`` for XLabs; the negative branch uses a zero embedding), projects them to
image tokens and then to per-block ``(K, V)``, and passes them, the scales and the inverse RoPE angles of the
image tokens through ``attention_kwargs``. Both published adapters attend with the **pre-RoPE** (QK-normed) query;
the processor slot receives rotated queries, so the processor rotates the image rows back (RoPE is a rotation;
text ids are 0, so text rows are unrotated already).

* InstantX, every double and single block: ``out[rows] += scale * attention(q_pre[rows], K_ip, V_ip)`` before the
  output projection, where ``rows`` are the image-stream tokens in double blocks (target + reference) and every
  token in single blocks (the published processor attends with the whole joint sequence there).
* XLabs, double blocks only: ``scale * attention(q_pre[target], K_ip, V_ip)`` is added to the target-image
  tokens *after* the block (diffusers adds it after the MLP, ungated): the processor leaves it in a per-call
  scratch and the branch's ``block_residual`` adds it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffstudio.dit.extensions import SummedResidual
from diffstudio.errors import PipelineInputError
from diffstudio.nn import DEFAULT_PROCESSOR, AttentionContext, RopeFreqs, apply_rope, attention
from diffstudio.pipeline.base import BasePipeline
from diffstudio.pipeline.units import InputParam, OutputParam, PipelineUnit
from torch import Tensor

from diffstudio_ipadapter.encoders import encode_images

IP_KEY = "ipadapter"


@dataclass
class IPState:
    """One branch's IP-Adapter inputs for the processor.

    Attributes:
        kind: ``"instantx"`` or ``"xlabs"``.
        kv: ``{(kind, index): (K, V, scale)}``, K/V ``(B, T, H, Dh)``.
        inverse: RoPE angles that undo the rotation of the image-stream tokens (target then reference).
        scratch: XLabs outputs of the current call, ``{index: (B, L_img, D)}``.
    """

    kind: str
    kv: dict[tuple[str, int], tuple[Tensor, Tensor, float]]
    inverse: RopeFreqs
    scratch: dict[int, Tensor] = field(default_factory=dict)


class IPAdapterProcessor:
    """The block's own attention (``inner``) plus the IP-Adapter's decoupled attention (see the module docstring).

    It wraps whatever processor the block had (plain SDPA, EliGen's regional one, ...), so adapters compose: the
    family's convention for wrapping processors is an ``inner`` attribute and a ``with_inner(processor)`` copy.
    """

    def __init__(self, inner: Any = DEFAULT_PROCESSOR) -> None:
        self.inner = inner

    def with_inner(self, inner: Any) -> IPAdapterProcessor:
        """This processor around another inner one."""
        return IPAdapterProcessor(inner)

    def __repr__(self) -> str:
        return f"IPAdapterProcessor(inner={self.inner!r})"

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, context: AttentionContext) -> Tensor:
        """``(B, Lq, H, Dh)`` out."""
        out: Tensor = self.inner(q, k, v, context)
        state: IPState | None = context.extras.get(IP_KEY)
        entry = None if state is None else state.kv.get((context.kind, context.index))
        if state is None or entry is None:
            return out
        k_ip, v_ip, scale = entry
        start = context.txt_len
        stop = start + context.img_len + (context.ref_len if state.kind == "instantx" else 0)
        image = apply_rope(q[:, start:stop], RopeFreqs(state.inverse.cos[:, : stop - start],
                                                       state.inverse.sin[:, : stop - start]))  # fmt: skip
        if state.kind == "xlabs":
            ip = attention(image, k_ip.to(q.dtype), v_ip.to(q.dtype)) * scale
            state.scratch[context.index] = ip.flatten(2)
            return out
        if context.kind == "single":
            rows = torch.cat([q[:, :start], image, q[:, stop:]], dim=1)
            return out + scale * attention(rows, k_ip.to(q.dtype), v_ip.to(q.dtype))
        ip = scale * attention(image, k_ip.to(q.dtype), v_ip.to(q.dtype))
        return torch.cat([out[:, :start], out[:, start:stop] + ip, out[:, stop:]], dim=1)


PROCESSOR = IPAdapterProcessor()


class XLabsResidual:
    """``block_residual`` adding the XLabs output that the processor computed in double block ``index``."""

    def __init__(self, state: IPState) -> None:
        self.state = state

    def __call__(self, kind: str, index: int, img: Tensor) -> Tensor | None:
        """The scratch output ``(B, L_img, D)`` of this double block, or None."""
        if kind != "double":
            return None
        return self.state.scratch.pop(index, None)


def block_scales(scale: Any, count: int) -> list[float]:
    """``ipadapter_scale`` as one float per adapter block.

    Raises:
        PipelineInputError: A list of the wrong length or a non-number.
    """
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return [float(scale)] * count
    if isinstance(scale, Sequence) and not isinstance(scale, str) and len(scale) == count:
        return [float(s) for s in scale]
    raise PipelineInputError(f"ipadapter_scale must be a number or a list of {count} numbers (one per adapter block)")


class IPAdapterPrepare(PipelineUnit):
    """Image tokens, per-block K/V and the processor, per CFG branch."""

    name = "ipadapter_prepare"
    description = (
        "Encodes ipadapter_images (SigLIP / CLIP; zero embedding on the negative branch), projects them to "
        "per-block (K, V) and installs the decoupled-attention processor; XLabs also adds a block_residual."
    )
    components = ("ipadapter", "ipadapter_image_encoder", "dit")
    optional_components = ("ipadapter", "ipadapter_image_encoder")
    per_branch = True
    after = ("flux1_extensions", "flux1_image_ids", "flux1_kontext", "eligen_prepare")
    inputs = (
        InputParam("ipadapter_images", "PIL image or list of PIL images"),
        InputParam("ipadapter_scale", "a number, or one per adapter block (1.0)"),
        InputParam("image_ids", "(B, L_img, 3) ids", True),
        InputParam("kontext_image_ids", "(1, L_ref, 3) reference ids"),
        InputParam(
            "attention_kwargs", "attention extras of the branch", per_branch=True, negative_name="attention_kwargs"
        ),
        InputParam("block_residual", "residual hook of the branch", per_branch=True, negative_name="block_residual"),
        InputParam("prompt_emb", "(B, L, 4096)", True, per_branch=True, negative_name="prompt_emb"),
        InputParam("ipadapter_negative", "internal: True on the negative branch", per_branch=True),
    )
    outputs = (
        OutputParam("attention_kwargs", f"attention extras with {IP_KEY!r}", optional=True),
        OutputParam("block_residual", "XLabs: the adapter's after-block output added", optional=True),
    )

    def process(self, pipe: BasePipeline, **inputs: Any) -> Mapping[str, Any]:
        images = inputs["ipadapter_images"]
        if images is None:
            return {}
        if not pipe.has("ipadapter"):
            raise PipelineInputError("ipadapter_images were given but no IP-Adapter is loaded; add its ModelConfig")
        if not pipe.has("ipadapter_image_encoder"):
            raise PipelineInputError(
                "ipadapter_images need the IP-Adapter's image encoder: add a ModelConfig for it (SigLIP "
                "google/siglip-so400m-patch14-384 for InstantX, the CLIP vision model for XLabs)"
            )
        adapter, dit = pipe.ipadapter, pipe.dit
        scales = block_scales(
            1.0 if inputs["ipadapter_scale"] is None else inputs["ipadapter_scale"], adapter.num_blocks
        )
        batch = inputs["prompt_emb"].shape[0]
        embeds = encode_images(pipe.ipadapter_image_encoder, images, "ipadapter_images").to(pipe.device)
        if inputs["ipadapter_negative"]:
            embeds = torch.zeros_like(embeds)
        dtype = next(adapter.parameters()).dtype
        tokens = adapter.image_tokens(embeds.to(dtype).mean(0, keepdim=True))  # several images: mean embedding
        kv = adapter.block_kv(tokens.expand(batch, -1, -1), dit.num_heads)
        names = [("double", i) for i in range(len(dit.double_blocks))] + [
            ("single", i) for i in range(len(dit.single_blocks))
        ]
        state = IPState(adapter.kind, {n: (k, v, s) for n, (k, v), s in zip(names, kv, scales)}, _inverse(dit, inputs))
        blocks = [f"{kind}_{i}" for kind, i in state.kv]
        install_processor(dit, blocks)
        out: dict[str, Any] = {"attention_kwargs": {**(inputs["attention_kwargs"] or {}), IP_KEY: state}}
        if adapter.kind == "xlabs":
            previous = inputs["block_residual"]
            hook = XLabsResidual(state)
            out["block_residual"] = hook if previous is None else SummedResidual(previous, hook)
        return out


def _wraps_ipadapter(processor: Any) -> bool:
    while processor is not None:
        if isinstance(processor, IPAdapterProcessor):
            return True
        processor = getattr(processor, "inner", None)
    return False


def install_processor(dit: Any, blocks: Sequence[str]) -> None:
    """Wrap each block's current processor in the IP-Adapter's (blocks that already have it keep theirs)."""
    current = dit.attn_processors
    for block in blocks:
        processor = current[block]
        if not _wraps_ipadapter(processor):
            dit.set_attn_processor(PROCESSOR if processor is DEFAULT_PROCESSOR else IPAdapterProcessor(processor),
                                   [block])  # fmt: skip


def _inverse(dit: Any, inputs: Mapping[str, Any]) -> RopeFreqs:
    ids = inputs["image_ids"]
    if ids.ndim == 2:
        ids = ids[None]
    ref = inputs["kontext_image_ids"]
    if ref is not None:
        ids = torch.cat([ids, ref.to(ids.device).expand(ids.shape[0], -1, -1)], dim=1)
    freqs: RopeFreqs = dit.pe_embedder(ids)
    return RopeFreqs(freqs.cos, -freqs.sin)


class IPAdapterBranch(PipelineUnit):
    """Marks the negative branch (it gets a zero image embedding)."""

    name = "ipadapter_branch"
    description = "Writes negative_ipadapter_negative = True so ipadapter_prepare zeroes the negative embedding."
    before = ("ipadapter_prepare",)
    inputs = (InputParam("ipadapter_images", "the IP-Adapter images"),)
    outputs = (OutputParam("negative_ipadapter_negative", "True", optional=True),)

    def process(self, pipe: BasePipeline, **inputs: Any) -> Mapping[str, Any]:
        return {} if inputs["ipadapter_images"] is None else {"negative_ipadapter_negative": True}
