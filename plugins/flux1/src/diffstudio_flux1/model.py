"""The FLUX.1 DiT (``Flux``): BFL's reference forward plus documented extension points.

Module attribute names equal the keys of BFL's FLUX.1 checkpoints (``flux1-dev.safetensors``,
``flux1-schnell.safetensors``, ``flux1-kontext-dev.safetensors``, ``flux1-fill-dev.safetensors``), so those
files load by identity; diffusers ``transformer/`` folders go through :mod:`diffstudio_flux1.convert`. See the
plugin README for the extension points.
"""

from __future__ import annotations

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

from diffstudio_flux1.layers import (
    DoubleStreamBlock,
    EmbedND,
    LastLayer,
    MLPEmbedder,
    SingleStreamBlock,
)
from diffstudio_flux1.params import TIMESTEP_DIM, FluxParams

_COND_HINT = " (with img_cond: image + conditioning channels)"

__all__ = ["BlockResidualHook", "Flux", "StackHook"]


class Flux(DualStreamStack):
    """FLUX.1 flow-matching transformer (dev, schnell, Kontext, Fill-shaped inputs).

    Memory metadata (read by VRAM policies and trainers, see ``diffstudio.vram.metadata``): ``repeated_blocks``
    names the ModuleLists of identical blocks, ``memory_leaves`` the layers whose weights are only read in their
    own forward, ``keep_in_high_precision`` holds fnmatch patterns over state-dict keys that are never stored
    below the computation dtype (no float8 for norms and the timestep / guidance / vector embedders).
    """

    keep_in_high_precision: ClassVar[tuple[str, ...]] = ("*norm*", "time_in.*", "guidance_in.*", "vector_in.*")

    def __init__(self, params: FluxParams) -> None:
        super().__init__()
        self.params = params
        self.in_channels = params.in_channels
        self.out_channels = params.out_channels
        self.hidden_size = params.hidden_size
        self.num_heads = params.num_heads
        self.use_gradient_checkpointing = False
        h = params.hidden_size
        self.pe_embedder = EmbedND(theta=params.theta, axes_dim=params.axes_dim)
        self.img_in = DeltaLinear(params.in_channels, h)
        self.time_in = MLPEmbedder(TIMESTEP_DIM, h)
        self.vector_in = MLPEmbedder(params.vec_in_dim, h)
        if params.guidance_embed:
            self.guidance_in = MLPEmbedder(TIMESTEP_DIM, h)
        self.txt_in = DeltaLinear(params.context_in_dim, h)
        self.double_blocks = nn.ModuleList(
            [DoubleStreamBlock(h, params.num_heads, params.mlp_ratio, params.qkv_bias) for _ in range(params.depth)]
        )
        self.single_blocks = nn.ModuleList(
            [SingleStreamBlock(h, params.num_heads, params.mlp_ratio) for _ in range(params.depth_single_blocks)]
        )
        self.final_layer = LastLayer(h, params.out_channels)

    @property
    def guidance_embed(self) -> bool:
        """Whether the model embeds a guidance strength (dev, Kontext) or not (schnell)."""
        return self.params.guidance_embed

    # --- forward

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        *,
        img_cond: Tensor | None = None,
        extra_img: Tensor | None = None,
        extra_img_ids: Tensor | None = None,
        extra_txt: Tensor | None = None,
        extra_txt_ids: Tensor | None = None,
        kv_extension: Mapping[str, tuple[Tensor, Tensor]] | None = None,
        block_residual: BlockResidualHook | None = None,
        attention_kwargs: Mapping[str, Any] | None = None,
        skip_blocks: Collection[str] | None = None,
        stack_hook: StackHook | None = None,
    ) -> Tensor:
        """Predict the flow velocity of the target-image tokens.

        Args:
            img: Packed latent tokens ``(B, L_img, C_img)``.
            img_ids: Their position ids ``(B, L_img, 3)`` (or ``(L_img, 3)``), ``(0, row, col)``.
            txt: T5 tokens ``(B or 1, L_txt, context_in_dim)``.
            txt_ids: Their ids ``(B, L_txt, 3)`` (or ``(L_txt, 3)``), zeros.
            timesteps: Flow-matching times in ``[0, 1]``, ``(B,)``.
            y: Pooled CLIP vector ``(B or 1, vec_in_dim)``.
            guidance: Embedded guidance ``(B,)``; required by models with ``guidance_in``, else ignored.
            img_cond: Conditioning channels ``(B or 1, L_img, C_cond)`` concatenated to ``img`` along channels
                (Fill / Flex); ``C_img + C_cond`` must equal ``in_channels``.
            extra_img: Extra image tokens ``(B or 1, L_ref, in_channels)`` appended after ``img`` (Kontext);
                they take part in attention, their outputs are dropped.
            extra_img_ids: Their ids ``(B or 1, L_ref, 3)``, e.g. ``(1, row, col)`` for Kontext.
            extra_txt: Extra text tokens ``(B or 1, L_extra, context_in_dim)`` appended after ``txt``.
            extra_txt_ids: Their ids; default zeros like every FLUX.1 text token.
            kv_extension: Per-block ``(K, V)``, each ``(B or 1, L_kv, H, Dh)`` in the block's post-RoPE key
                space, keyed ``"double_{i}"`` / ``"single_{i}"``; appended to that block's keys and values.
            block_residual: Called after every block; a returned residual is added to the target-image tokens.
            attention_kwargs: Passed to every attention processor as ``context.extras``.
            skip_blocks: Block names not to run.
            stack_hook: Wraps the block stack (cache / skip all blocks), see :class:`StackHook`.

        Returns:
            Velocity of the target-image tokens, ``(B, L_img, out_channels)``.
        """
        batch, img_len = img.shape[0], img.shape[1]
        if img_cond is not None:
            img = torch.cat([img, match_batch(img_cond, batch, "img_cond").to(img.dtype)], dim=-1)
        img_ids = check_tokens(img, img_ids, self.in_channels, "img", batch, 3, _COND_HINT)
        txt_ids = check_tokens(txt, txt_ids, self.params.context_in_dim, "txt", batch, 3)
        txt = match_batch(txt, batch, "txt")
        y = match_batch(y, batch, "y")
        timesteps = per_sample(timesteps, batch, "timesteps")
        if extra_img is not None:
            if extra_img_ids is None:
                raise ValueError("extra_img needs extra_img_ids (Kontext: (1, row, col) per reference token)")
            extra_img_ids = check_tokens(extra_img, extra_img_ids, self.in_channels, "extra_img", batch, 3)
            img = torch.cat([img, match_batch(extra_img, batch, "extra_img").to(img.dtype)], dim=1)
            img_ids = cat_ids(img_ids, extra_img_ids)
        if extra_txt is not None:
            if extra_txt_ids is None:
                extra_txt_ids = torch.zeros(1, extra_txt.shape[1], 3, dtype=torch.long, device=txt.device)
            extra_txt_ids = check_tokens(extra_txt, extra_txt_ids, self.params.context_in_dim, "extra_txt", batch, 3)
            txt = torch.cat([txt, match_batch(extra_txt, batch, "extra_txt").to(txt.dtype)], dim=1)
            txt_ids = cat_ids(txt_ids, extra_txt_ids)
        kv = dict(kv_extension or {})
        skip = frozenset(skip_blocks or ())
        self.check_block_names(kv, skip)

        vec = self.time_in(timestep_embedding(timesteps.to(img.dtype), TIMESTEP_DIM))  # (B, D)
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("this FLUX.1 model is guidance-distilled (dev/Kontext): pass guidance (B,)")
            guidance = per_sample(guidance, batch, "guidance")
            vec = vec + self.guidance_in(timestep_embedding(guidance.to(img.dtype), TIMESTEP_DIM))
        vec = vec + self.vector_in(y.to(img.dtype))
        x = self.img_in(img)  # (B, L_img + L_ref, D)
        t = self.txt_in(txt)  # (B, L_txt, D)
        pe = self.pe_embedder(cat_ids(txt_ids, img_ids))  # cos/sin (B, L_txt + L_img + L_ref, Dh / 2)
        extras = attention_kwargs or {}
        layout = (t.shape[1], img_len, x.shape[1] - img_len)

        def modulated() -> Tensor:  # the first double block's modulated image input (TeaCache's estimator)
            (shift, scale, _), _ = self.double_blocks[0].img_mod(vec)
            return modulate(self.double_blocks[0].img_norm1(x), shift, scale)

        run = StackRun(self, x, t, (vec, pe), (vec, pe), layout, kv, skip, block_residual, extras, modulated)
        out = run() if stack_hook is None else stack_hook(x, vec, run)
        velocity: Tensor = self.final_layer(out[:, :img_len], vec)  # (B, L_img, out_channels)
        return velocity
