"""The FLUX.1 DiT (``Flux``): BFL's reference forward plus documented extension points.

Module attribute names equal the keys of BFL's FLUX.1 checkpoints (``flux1-dev.safetensors``,
``flux1-schnell.safetensors``, ``flux1-kontext-dev.safetensors``, ``flux1-fill-dev.safetensors``), so those
files load by identity; diffusers ``transformer/`` folders go through :mod:`diffstudio_flux1.convert`. See the
plugin README for the extension points.
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
    RopeFreqs,
    match_batch,
    timestep_embedding,
)
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diffstudio_flux1.layers import (
    DoubleStreamBlock,
    EmbedND,
    LastLayer,
    MLPEmbedder,
    SingleStreamBlock,
)
from diffstudio_flux1.params import TIMESTEP_DIM, FluxParams

_T = TypeVar("_T")


class BlockResidualHook(Protocol):
    """Called after every block: ``hook(kind, index, img) -> residual or None``.

    ``img`` is the target-image tokens ``(B, L_img, D)`` after block ``index`` of ``kind`` (``"double"`` or
    ``"single"``); a returned tensor of the same shape is added to them (ControlNet / InfiniteYou residuals).
    """

    def __call__(self, kind: BlockKind, index: int, img: Tensor) -> Tensor | None:
        """Return a residual ``(B, L_img, D)`` for the target-image tokens, or None."""
        ...


class StackHook(Protocol):
    """Wraps the whole block stack: ``hook(img, vec, run) -> img_out`` (TeaCache-style block skipping).

    ``img`` is the embedded image tokens ``(B, L_img + L_ref, D)`` before the first block, ``vec`` the
    conditioning vector ``(B, D)``, and ``run()`` runs every block and returns the image tokens after the last
    one (same shape). A hook may call ``run()`` or skip it and return e.g. ``img + cached_residual``.
    """

    def __call__(self, img: Tensor, vec: Tensor, run: Callable[[], Tensor]) -> Tensor:
        """Return the image tokens after the stack, ``(B, L_img + L_ref, D)``."""
        ...


class Flux(nn.Module):
    """FLUX.1 flow-matching transformer (dev, schnell, Kontext, Fill-shaped inputs).

    Memory metadata (read by VRAM policies and trainers, see ``diffstudio.vram.metadata``): ``repeated_blocks``
    names the ModuleLists of identical blocks, ``memory_leaves`` the layers whose weights are only read in their
    own forward, ``keep_in_high_precision`` holds fnmatch patterns over state-dict keys that are never stored
    below the computation dtype (no float8 for norms and the timestep / guidance / vector embedders).
    """

    repeated_blocks: ClassVar[tuple[str, ...]] = ("double_blocks", "single_blocks")
    memory_leaves: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, RMSNorm)
    no_split_modules: ClassVar[tuple[str, ...]] = ("DoubleStreamBlock", "SingleStreamBlock")
    keep_in_high_precision: ClassVar[tuple[str, ...]] = ("*norm*", "time_in.*", "guidance_in.*", "vector_in.*")
    supports_gradient_checkpointing: ClassVar[bool] = True

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
        img_ids = _check_tokens(img, img_ids, self.in_channels, "img", batch)
        txt_ids = _check_tokens(txt, txt_ids, self.params.context_in_dim, "txt", batch)
        txt = match_batch(txt, batch, "txt")
        y = match_batch(y, batch, "y")
        timesteps = _per_sample(timesteps, batch, "timesteps")
        if extra_img is not None:
            if extra_img_ids is None:
                raise ValueError("extra_img needs extra_img_ids (Kontext: (1, row, col) per reference token)")
            extra_img_ids = _check_tokens(extra_img, extra_img_ids, self.in_channels, "extra_img", batch)
            img = torch.cat([img, match_batch(extra_img, batch, "extra_img").to(img.dtype)], dim=1)
            img_ids = _cat_ids(img_ids, extra_img_ids)
        if extra_txt is not None:
            if extra_txt_ids is None:
                extra_txt_ids = torch.zeros(1, extra_txt.shape[1], 3, dtype=torch.long, device=txt.device)
            extra_txt_ids = _check_tokens(extra_txt, extra_txt_ids, self.params.context_in_dim, "extra_txt", batch)
            txt = torch.cat([txt, match_batch(extra_txt, batch, "extra_txt").to(txt.dtype)], dim=1)
            txt_ids = _cat_ids(txt_ids, extra_txt_ids)
        kv = dict(kv_extension or {})
        skip = frozenset(skip_blocks or ())
        unknown = sorted((set(kv) | skip) - set(self.block_names))
        if unknown:
            raise ValueError(f"unknown block names {unknown} in kv_extension/skip_blocks; known: double_i, single_i")

        vec = self.time_in(timestep_embedding(timesteps.to(img.dtype), TIMESTEP_DIM))  # (B, D)
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("this FLUX.1 model is guidance-distilled (dev/Kontext): pass guidance (B,)")
            guidance = _per_sample(guidance, batch, "guidance")
            vec = vec + self.guidance_in(timestep_embedding(guidance.to(img.dtype), TIMESTEP_DIM))
        vec = vec + self.vector_in(y.to(img.dtype))
        x = self.img_in(img)  # (B, L_img + L_ref, D)
        t = self.txt_in(txt)  # (B, L_txt, D)
        pe = self.pe_embedder(_cat_ids(txt_ids, img_ids))  # cos/sin (B, L_txt + L_img + L_ref, Dh / 2)
        extras = attention_kwargs or {}
        layout = (t.shape[1], img_len, x.shape[1] - img_len)

        def run() -> Tensor:
            return self._blocks(x, t, vec, pe, layout, kv, skip, block_residual, extras)

        out = run() if stack_hook is None else stack_hook(x, vec, run)
        velocity: Tensor = self.final_layer(out[:, :img_len], vec)  # (B, L_img, out_channels)
        return velocity

    def _blocks(
        self,
        img: Tensor,
        txt: Tensor,
        vec: Tensor,
        pe: RopeFreqs,
        layout: tuple[int, int, int],
        kv: Mapping[str, tuple[Tensor, Tensor]],
        skip: frozenset[str],
        block_residual: BlockResidualHook | None,
        extras: Mapping[str, Any],
    ) -> Tensor:
        """Run the double then the single blocks; return the image tokens ``(B, L_img + L_ref, D)``."""
        txt_len, img_len, ref_len = layout
        for i, double in enumerate(self.double_blocks):
            name = f"double_{i}"
            if name in skip:
                continue
            ext = kv.get(name)
            context = AttentionContext("double", i, txt_len, img_len, ref_len, _kv_len(ext), extras)
            img, txt = self._call(double, img, txt, vec, pe, context, ext)
            if block_residual is not None:
                img = _add_residual(img, block_residual("double", i, img[:, :img_len]), 0, img_len)
        seq = torch.cat((txt, img), dim=1)  # (B, L_txt + L_img + L_ref, D)
        start = txt_len  # where the image tokens begin in seq
        run = [i for i in range(len(self.single_blocks)) if f"single_{i}" not in skip]
        for i in run:
            ext = kv.get(f"single_{i}")
            context = AttentionContext("single", i, txt_len, img_len, ref_len, _kv_len(ext), extras)
            last = i == run[-1]  # its text outputs are never read: it returns the image tokens only
            seq = self._call(self.single_blocks[i], seq, vec, pe, context, ext, txt_len if last else 0)
            start = 0 if last else txt_len
            if block_residual is not None:
                residual = block_residual("single", i, seq[:, start : start + img_len])
                seq = _add_residual(seq, residual, start, img_len)
        return seq[:, start:]

    def _call(self, block: Callable[..., _T], *args: Any) -> _T:
        if self.use_gradient_checkpointing and self.training and torch.is_grad_enabled():
            out: _T = checkpoint(block, *args, use_reentrant=False)
            return out
        return block(*args)


def _kv_len(ext: tuple[Tensor, Tensor] | None) -> int:
    return 0 if ext is None else int(ext[0].shape[1])


def _check_tokens(tokens: Tensor, ids: Tensor, channels: int, what: str, batch: int) -> Tensor:
    """Validate ``tokens (B|1, L, channels)`` and ``ids (B|1, L, 3)`` / ``(L, 3)``; return 3-D ids."""
    if tokens.ndim != 3 or tokens.shape[-1] != channels:
        hint = " (with img_cond: image + conditioning channels)" if what == "img" else ""
        raise ValueError(f"{what} must have shape (B, L, {channels}){hint}, got {tuple(tokens.shape)}")
    if ids.ndim == 2:
        ids = ids.unsqueeze(0)
    if ids.ndim != 3 or ids.shape[1] != tokens.shape[1] or ids.shape[2] != 3:
        raise ValueError(
            f"{what}_ids must have shape (B, {tokens.shape[1]}, 3) for {what} {tuple(tokens.shape)}, "
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
    """Concatenate ids ``(B|1, L1, 3)`` and ``(B|1, L2, 3)`` along tokens, broadcasting the batch."""
    batch = max(first.shape[0], second.shape[0])
    return torch.cat([first.expand(batch, -1, -1), second.to(first.device).expand(batch, -1, -1)], dim=1)


def _add_residual(seq: Tensor, residual: Tensor | None, start: int, length: int) -> Tensor:
    """Add ``residual (B, length, D)`` to ``seq[:, start:start + length]`` without in-place writes."""
    if residual is None:
        return seq
    if residual.shape[1:] != (length, seq.shape[2]):
        raise ValueError(f"block residual must have shape (B, {length}, {seq.shape[2]}), got {tuple(residual.shape)}")
    if start == 0 and length == seq.shape[1]:
        return seq + residual
    head, mid, tail = seq[:, :start], seq[:, start : start + length], seq[:, start + length :]
    return torch.cat([head, mid + residual.to(seq.dtype), tail], dim=1)
