"""The FLUX.2 DiT (``Flux2``): BFL's reference forward plus documented extension points.

Module attribute names equal the keys of BFL's FLUX.2 checkpoints (``flux2-dev.safetensors``,
``flux-2-klein-*.safetensors``), so those files load by identity; diffusers folders go through
:mod:`diffstudio_flux2.convert`. See the plugin README for the extension points.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Mapping
from typing import Any, ClassVar

import torch
from diffstudio.dit.extensions import BlockResidualHook, StackHook
from diffstudio.dit.stack import DualStreamStack, StackRun, cat_ids, check_tokens, per_sample
from diffstudio.nn import (
    DeltaLinear,
    match_batch,
    modulate,
    timestep_embedding,
)
from torch import Tensor, nn

from diffstudio_flux2.layers import (
    DoubleStreamBlock,
    EmbedND,
    LastLayer,
    MLPEmbedder,
    Modulation,
    SingleStreamBlock,
)
from diffstudio_flux2.math import text_ids
from diffstudio_flux2.params import TIMESTEP_DIM, Flux2Params

__all__ = ["BlockResidualHook", "Flux2", "StackHook"]


class Flux2(DualStreamStack):
    """FLUX.2 flow-matching transformer (dev and klein variants).

    Memory metadata (read by VRAM policies and trainers, see ``diffstudio.vram.metadata``): ``repeated_blocks``
    names the ModuleLists of identical blocks, ``memory_leaves`` the layers whose weights are only read in their
    own forward, ``keep_in_high_precision`` holds fnmatch patterns over state-dict keys that are never stored
    below the computation dtype (norm scales, timestep/guidance embedders).
    """

    keep_in_high_precision: ClassVar[tuple[str, ...]] = ("*norm*", "time_in.*", "guidance_in.*")

    def __init__(self, params: Flux2Params) -> None:
        super().__init__()
        self.params = params
        self.in_channels = params.in_channels
        self.out_channels = params.in_channels
        self.hidden_size = params.hidden_size
        self.num_heads = params.num_heads
        self.use_guidance_embed = params.use_guidance_embed
        self.use_gradient_checkpointing = False

        self.pe_embedder = EmbedND(theta=params.theta, axes_dim=params.axes_dim)
        self.img_in = DeltaLinear(params.in_channels, params.hidden_size, bias=False)
        self.time_in = MLPEmbedder(TIMESTEP_DIM, params.hidden_size)
        if params.use_guidance_embed:
            self.guidance_in = MLPEmbedder(TIMESTEP_DIM, params.hidden_size)
        self.txt_in = DeltaLinear(params.context_in_dim, params.hidden_size, bias=False)
        self.double_blocks = nn.ModuleList(
            [DoubleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio) for _ in range(params.depth)]
        )
        self.single_blocks = nn.ModuleList(
            [
                SingleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio)
                for _ in range(params.depth_single_blocks)
            ]
        )
        self.double_stream_modulation_img = Modulation(params.hidden_size, double=True)
        self.double_stream_modulation_txt = Modulation(params.hidden_size, double=True)
        self.single_stream_modulation = Modulation(params.hidden_size, double=False)
        self.final_layer = LastLayer(params.hidden_size, self.out_channels)

    # --- forward

    def forward(
        self,
        x: Tensor,
        x_ids: Tensor,
        timesteps: Tensor,
        ctx: Tensor,
        ctx_ids: Tensor,
        guidance: Tensor | None = None,
        *,
        extra_img: Tensor | None = None,
        extra_img_ids: Tensor | None = None,
        extra_txt: Tensor | None = None,
        extra_txt_ids: Tensor | None = None,
        kv_extension: Mapping[str, tuple[Tensor, Tensor]] | None = None,
        block_residual: BlockResidualHook | None = None,
        attention_kwargs: Mapping[str, Any] | None = None,
        skip_blocks: Collection[str] | None = None,
        stack_hook: StackHook | None = None,
        **deprecated: Tensor | None,
    ) -> Tensor:
        """Predict the flow velocity of the target-image tokens.

        Args:
            x: Packed latent tokens ``(B, L_img, in_channels)``.
            x_ids: Their position ids ``(B, L_img, 4)`` (or ``(L_img, 4)``).
            timesteps: Flow-matching times in ``[0, 1]``, ``(B,)``.
            ctx: Text-encoder tokens ``(B, L_txt, context_in_dim)``.
            ctx_ids: Their position ids ``(B, L_txt, 4)`` (or ``(L_txt, 4)``).
            guidance: Embedded guidance ``(B,)``; used only by models with ``guidance_in`` (else ignored).
            extra_img: Extra image tokens ``(B or 1, L_ref, in_channels)`` appended after ``x`` (edit/reference
                images); they take part in attention but their outputs are dropped.
            extra_img_ids: Their ids ``(B or 1, L_ref, 4)``, e.g. ``t = 10, 20, ...`` per reference image.
            extra_txt: Extra text tokens ``(B or 1, L_extra, context_in_dim)`` appended after ``ctx``.
            extra_txt_ids: Their ids; default ``(0, 0, 0, L_txt + k)`` continuing the text index.
            kv_extension: Per-block ``(K, V)``, each ``(B or 1, L_kv, H, Dh)`` in the block's post-RoPE key
                space, keyed ``"double_{i}"`` / ``"single_{i}"``; appended to that block's keys and values.
            block_residual: Called after every block; a returned residual is added to the target-image tokens.
            attention_kwargs: Passed to every attention processor as ``context.extras``.
            skip_blocks: Block names to skip entirely.
            stack_hook: Wraps the block stack (cache / skip all blocks), see :class:`StackHook`.
            **deprecated: ``extra_x``, ``extra_x_ids``, ``extra_ctx``, ``extra_ctx_ids``: the old names of the
                ``extra_img*`` / ``extra_txt*`` arguments (DeprecationWarning; removed in the next release).

        Returns:
            Velocity of the target-image tokens, ``(B, L_img, in_channels)``.
        """
        renamed = _renamed(deprecated)
        extra_img, extra_img_ids = renamed.get("extra_img", extra_img), renamed.get("extra_img_ids", extra_img_ids)
        extra_txt, extra_txt_ids = renamed.get("extra_txt", extra_txt), renamed.get("extra_txt_ids", extra_txt_ids)
        img_name = "extra_x" if "extra_x" in deprecated else "extra_img"  # errors name what the caller passed
        txt_name = "extra_ctx" if "extra_ctx" in deprecated else "extra_txt"
        batch, img_len = x.shape[0], x.shape[1]
        x_ids = check_tokens(x, x_ids, self.in_channels, "x", batch, 4)
        ctx_ids = check_tokens(ctx, ctx_ids, self.params.context_in_dim, "ctx", batch, 4)
        ctx = match_batch(ctx, batch, "ctx")  # one prompt may serve the whole batch
        timesteps = per_sample(timesteps, batch, "timesteps")
        guidance = None if guidance is None else per_sample(guidance, batch, "guidance")
        if extra_img is not None:
            if extra_img_ids is None:
                raise ValueError(f"{img_name} needs {img_name}_ids (e.g. t = 10 * (i + 1) per reference image)")
            extra_img_ids = check_tokens(extra_img, extra_img_ids, self.in_channels, img_name, batch, 4)
            x = torch.cat([x, match_batch(extra_img, batch, img_name)], dim=1)
            x_ids = cat_ids(x_ids, extra_img_ids)
        if extra_txt is not None:
            if extra_txt_ids is None:
                extra_txt_ids = text_ids(1, extra_txt.shape[1], start=ctx.shape[1], device=ctx.device)
            extra_txt_ids = check_tokens(extra_txt, extra_txt_ids, self.params.context_in_dim, txt_name, batch, 4)
            ctx = torch.cat([ctx, match_batch(extra_txt, batch, txt_name)], dim=1)
            ctx_ids = cat_ids(ctx_ids, extra_txt_ids)
        kv = dict(kv_extension or {})
        skip = frozenset(skip_blocks or ())
        self.check_block_names(kv, skip)
        txt_len, ref_len = ctx.shape[1], x.shape[1] - img_len
        extras = attention_kwargs or {}

        vec = self.time_in(timestep_embedding(timesteps.to(x.dtype), TIMESTEP_DIM))  # (B, D)
        if self.use_guidance_embed and guidance is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance.to(x.dtype), TIMESTEP_DIM))
        mod_img = self.double_stream_modulation_img(vec)
        mod_txt = self.double_stream_modulation_txt(vec)
        mod_single, _ = self.single_stream_modulation(vec)

        img = self.img_in(x)  # (B, L_img + L_ref, D)
        txt = self.txt_in(ctx)  # (B, L_txt, D)
        pe = self.pe_embedder(cat_ids(ctx_ids, x_ids))  # cos/sin (B, L_txt + L_img + L_ref, Dh / 2)

        layout = (txt_len, img_len, ref_len)

        def modulated() -> Tensor:  # the first double block's modulated image input (TeaCache's estimator)
            shift, scale, _ = mod_img[0]
            return modulate(self.double_blocks[0].img_norm1(img), shift, scale)

        run = StackRun(self, img, txt, (pe, mod_img, mod_txt), (pe, mod_single), layout, kv, skip, block_residual,
                       extras, modulated)  # fmt: skip
        out = run() if stack_hook is None else stack_hook(img, vec, run)
        velocity: Tensor = self.final_layer(out[:, :img_len], vec)  # (B, L_img, in_channels)
        return velocity

_RENAMED = {"extra_x": "extra_img", "extra_x_ids": "extra_img_ids", "extra_ctx": "extra_txt",
            "extra_ctx_ids": "extra_txt_ids"}  # fmt: skip


def _renamed(deprecated: Mapping[str, Tensor | None]) -> dict[str, Tensor | None]:
    """Old FLUX.2 keyword names -> the shared ones, with a DeprecationWarning; unknown names are a TypeError."""
    unknown = sorted(set(deprecated) - set(_RENAMED))
    if unknown:
        raise TypeError(f"Flux2.forward() got unexpected keyword arguments {unknown}")
    for old in deprecated:
        warnings.warn(f"Flux2.forward({old}=...) is deprecated; pass {_RENAMED[old]}= (the shared DiT name)",
                      DeprecationWarning, stacklevel=5)  # fmt: skip
    return {_RENAMED[old]: value for old, value in deprecated.items()}
