"""The FLUX.2 DiT (``Flux2``): BFL's reference forward plus documented extension points.

Module attribute names equal the keys of BFL's FLUX.2 checkpoints (``flux2-dev.safetensors``,
``flux-2-klein-*.safetensors``), so those files load by identity; diffusers folders go through
:mod:`diffstudio_flux2.convert`. See the plugin README for the extension points.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, ClassVar, Protocol, TypeVar, cast

import torch
from diffstudio.nn import (
    DEFAULT_PROCESSOR,
    AttentionContext,
    AttentionProcessor,
    BlockKind,
    DeltaLinear,
    RMSNorm,
    match_batch,
    timestep_embedding,
)
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

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

_T = TypeVar("_T")


class BlockResidualHook(Protocol):
    """Called after every block: ``hook(kind, index, img) -> residual or None``.

    ``img`` is the target-image tokens ``(B, L_img, D)`` after block ``index`` of ``kind`` (``"double"`` or
    ``"single"``); a returned tensor of the same shape is added to them (ControlNet-style residuals).
    """

    def __call__(self, kind: BlockKind, index: int, img: Tensor) -> Tensor | None:
        """Return a residual ``(B, L_img, D)`` for the target-image tokens, or None."""
        ...


class Flux2(nn.Module):
    """FLUX.2 flow-matching transformer (dev and klein variants).

    Memory metadata (read by VRAM policies and trainers, see ``diffstudio.vram.metadata``): ``repeated_blocks``
    names the ModuleLists of identical blocks, ``memory_leaves`` the layers whose weights are only read in their
    own forward, ``keep_in_high_precision`` holds fnmatch patterns over state-dict keys that are never stored
    below the computation dtype (norm scales, timestep/guidance embedders).
    """

    repeated_blocks: ClassVar[tuple[str, ...]] = ("double_blocks", "single_blocks")
    memory_leaves: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, RMSNorm)
    no_split_modules: ClassVar[tuple[str, ...]] = ("DoubleStreamBlock", "SingleStreamBlock")
    keep_in_high_precision: ClassVar[tuple[str, ...]] = ("*norm*", "time_in.*", "guidance_in.*")
    supports_gradient_checkpointing: ClassVar[bool] = True

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
        self.img_in = _linear(params.in_channels, params.hidden_size)
        self.time_in = MLPEmbedder(TIMESTEP_DIM, params.hidden_size)
        if params.use_guidance_embed:
            self.guidance_in = MLPEmbedder(TIMESTEP_DIM, params.hidden_size)
        self.txt_in = _linear(params.context_in_dim, params.hidden_size)
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

    # --- attention processors

    @property
    def block_names(self) -> list[str]:
        """``double_0 .. double_{N-1}, single_0 .. single_{M-1}``: the keys of per-block extension inputs."""
        return [f"double_{i}" for i in range(len(self.double_blocks))] + [
            f"single_{i}" for i in range(len(self.single_blocks))
        ]

    def _named_blocks(self) -> Iterable[tuple[str, DoubleStreamBlock | SingleStreamBlock]]:
        for i, double in enumerate(self.double_blocks):
            yield f"double_{i}", cast(DoubleStreamBlock, double)
        for i, single in enumerate(self.single_blocks):
            yield f"single_{i}", cast(SingleStreamBlock, single)

    @property
    def attn_processors(self) -> dict[str, AttentionProcessor]:
        """The attention processor of every block, by block name."""
        return {name: block.processor for name, block in self._named_blocks()}

    def set_attn_processor(self, processor: AttentionProcessor, blocks: Iterable[str] | None = None) -> None:
        """Install ``processor`` in the named blocks (all blocks when ``blocks`` is None).

        Raises:
            ValueError: A name is not one of :attr:`block_names`.
        """
        named = dict(self._named_blocks())
        targets = list(named) if blocks is None else list(blocks)
        unknown = sorted(set(targets) - set(named))
        if unknown:
            raise ValueError(f"unknown block names {unknown}; valid names look like 'double_0', 'single_0'")
        for name in targets:
            named[name].set_processor(processor)

    def reset_attn_processors(self) -> None:
        """Put the default SDPA processor back into every block."""
        self.set_attn_processor(DEFAULT_PROCESSOR)

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
        extra_x: Tensor | None = None,
        extra_x_ids: Tensor | None = None,
        extra_ctx: Tensor | None = None,
        extra_ctx_ids: Tensor | None = None,
        kv_extension: Mapping[str, tuple[Tensor, Tensor]] | None = None,
        block_residual: BlockResidualHook | None = None,
        attention_kwargs: Mapping[str, Any] | None = None,
        skip_blocks: Collection[str] | None = None,
    ) -> Tensor:
        """Predict the flow velocity of the target-image tokens.

        Args:
            x: Packed latent tokens ``(B, L_img, in_channels)``.
            x_ids: Their position ids ``(B, L_img, 4)`` (or ``(L_img, 4)``).
            timesteps: Flow-matching times in ``[0, 1]``, ``(B,)``.
            ctx: Text-encoder tokens ``(B, L_txt, context_in_dim)``.
            ctx_ids: Their position ids ``(B, L_txt, 4)`` (or ``(L_txt, 4)``).
            guidance: Embedded guidance ``(B,)``; used only by models with ``guidance_in`` (else ignored).
            extra_x: Extra image tokens ``(B or 1, L_ref, in_channels)`` appended after ``x`` (edit/reference
                images); they take part in attention but their outputs are dropped.
            extra_x_ids: Their ids ``(B or 1, L_ref, 4)``, e.g. ``t = 10, 20, ...`` per reference image.
            extra_ctx: Extra text tokens ``(B or 1, L_extra, context_in_dim)`` appended after ``ctx``.
            extra_ctx_ids: Their ids; default ``(0, 0, 0, L_txt + k)`` continuing the text index.
            kv_extension: Per-block ``(K, V)``, each ``(B or 1, L_kv, H, Dh)`` in the block's post-RoPE key
                space, keyed ``"double_{i}"`` / ``"single_{i}"``; appended to that block's keys and values.
            block_residual: Called after every block; a returned residual is added to the target-image tokens.
            attention_kwargs: Passed to every attention processor as ``context.extras``.
            skip_blocks: Block names to skip entirely.

        Returns:
            Velocity of the target-image tokens, ``(B, L_img, in_channels)``.
        """
        batch, img_len = x.shape[0], x.shape[1]
        x_ids = _check_tokens(x, x_ids, self.in_channels, "x", batch)
        ctx_ids = _check_tokens(ctx, ctx_ids, self.params.context_in_dim, "ctx", batch)
        ctx = match_batch(ctx, batch, "ctx")  # one prompt may serve the whole batch
        timesteps = _per_sample(timesteps, batch, "timesteps")
        guidance = None if guidance is None else _per_sample(guidance, batch, "guidance")
        if extra_x is not None:
            if extra_x_ids is None:
                raise ValueError("extra_x needs extra_x_ids (e.g. t = 10 * (i + 1) per reference image)")
            extra_x_ids = _check_tokens(extra_x, extra_x_ids, self.in_channels, "extra_x", batch)
            x = torch.cat([x, match_batch(extra_x, batch, "extra_x")], dim=1)
            x_ids = _cat_ids(x_ids, extra_x_ids)
        if extra_ctx is not None:
            if extra_ctx_ids is None:
                extra_ctx_ids = text_ids(1, extra_ctx.shape[1], start=ctx.shape[1], device=ctx.device)
            extra_ctx_ids = _check_tokens(extra_ctx, extra_ctx_ids, self.params.context_in_dim, "extra_ctx", batch)
            ctx = torch.cat([ctx, match_batch(extra_ctx, batch, "extra_ctx")], dim=1)
            ctx_ids = _cat_ids(ctx_ids, extra_ctx_ids)
        kv = dict(kv_extension or {})
        skip = frozenset(skip_blocks or ())
        unknown = sorted((set(kv) | skip) - set(self.block_names))
        if unknown:
            raise ValueError(f"unknown block names {unknown} in kv_extension/skip_blocks; known: double_i, single_i")
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
        pe = self.pe_embedder(_cat_ids(ctx_ids, x_ids))  # cos/sin (B, L_txt + L_img + L_ref, Dh / 2)

        for i, double in enumerate(self.double_blocks):
            name = f"double_{i}"
            if name in skip:
                continue
            ext = kv.get(name)
            context = AttentionContext("double", i, txt_len, img_len, ref_len, _kv_len(ext), extras)
            img, txt = self._call(double, img, txt, pe, mod_img, mod_txt, context, ext)
            if block_residual is not None:
                img = _add_residual(img, block_residual("double", i, img[:, :img_len]), 0, img_len)

        seq = torch.cat((txt, img), dim=1)  # (B, L_txt + L_img + L_ref, D)
        start = txt_len  # where the image tokens begin in seq
        run = [i for i in range(len(self.single_blocks)) if f"single_{i}" not in skip]
        for i in run:
            ext = kv.get(f"single_{i}")
            context = AttentionContext("single", i, txt_len, img_len, ref_len, _kv_len(ext), extras)
            last = i == run[-1]  # its text outputs are never read: it returns the image tokens only
            seq = self._call(self.single_blocks[i], seq, pe, mod_single, context, ext, txt_len if last else 0)
            start = 0 if last else txt_len
            if block_residual is not None:
                residual = block_residual("single", i, seq[:, start : start + img_len])
                seq = _add_residual(seq, residual, start, img_len)

        img = seq[:, start : start + img_len]  # (B, L_img, D)
        out: Tensor = self.final_layer(img, vec)  # (B, L_img, in_channels)
        return out

    def _call(self, block: Callable[..., _T], *args: Any) -> _T:
        if self.use_gradient_checkpointing and self.training and torch.is_grad_enabled():
            out: _T = checkpoint(block, *args, use_reentrant=False)
            return out
        return block(*args)


def _linear(in_features: int, out_features: int) -> DeltaLinear:
    return DeltaLinear(in_features, out_features, bias=False)


def _kv_len(ext: tuple[Tensor, Tensor] | None) -> int:
    return 0 if ext is None else int(ext[0].shape[1])


def _check_tokens(tokens: Tensor, ids: Tensor, channels: int, what: str, batch: int) -> Tensor:
    """Validate ``tokens (B|1, L, channels)`` and ``ids (B|1, L, 4)`` / ``(L, 4)``; return 3-D ids."""
    if tokens.ndim != 3 or tokens.shape[-1] != channels:
        raise ValueError(f"{what} must have shape (B, L, {channels}), got {tuple(tokens.shape)}")
    if ids.ndim == 2:
        ids = ids.unsqueeze(0)
    if ids.ndim != 3 or ids.shape[1] != tokens.shape[1] or ids.shape[2] != 4:
        raise ValueError(
            f"{what}_ids must have shape (B, {tokens.shape[1]}, 4) for {what} {tuple(tokens.shape)}, "
            f"got {tuple(ids.shape)}"
        )
    for name, size in ((what, tokens.shape[0]), (f"{what}_ids", ids.shape[0])):
        if size not in (1, batch):
            raise ValueError(f"{name} has batch size {size}, expected 1 or {batch}")
    return ids


def _per_sample(values: Tensor, batch: int, what: str) -> Tensor:
    """Accept ``(B,)``, ``(1,)`` or a 0-d tensor; return ``(B,)``."""
    if values.ndim == 0 or values.shape == (1,):
        return values.reshape(1).expand(batch)
    if values.shape != (batch,):
        raise ValueError(f"{what} must have shape ({batch},) or (1,), got {tuple(values.shape)}")
    return values


def _cat_ids(first: Tensor, second: Tensor) -> Tensor:
    """Concatenate ids ``(B|1, L1, 4)`` and ``(B|1, L2, 4)`` along tokens, broadcasting the batch."""
    batch = max(first.shape[0], second.shape[0])
    return torch.cat([first.expand(batch, -1, -1), second.expand(batch, -1, -1)], dim=1)


def _add_residual(seq: Tensor, residual: Tensor | None, start: int, length: int) -> Tensor:
    """Add ``residual (B, length, D)`` to ``seq[:, start:start + length]`` without in-place writes."""
    if residual is None:
        return seq
    if residual.shape[1:] != (length, seq.shape[2]):
        raise ValueError(f"block residual must have shape (B, {length}, {seq.shape[2]}), got {tuple(residual.shape)}")
    if start == 0 and length == seq.shape[1]:
        return seq + residual
    head, mid, tail = seq[:, :start], seq[:, start : start + length], seq[:, start + length :]
    return torch.cat([head, mid + residual, tail], dim=1)
