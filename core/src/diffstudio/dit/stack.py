"""The dual-stream block stack both FLUX DiTs share, and the checks of their inputs.

Processor slots, block names and the double-then-single loop with its extension points (K/V extension, block
residuals, skipped blocks).

A family's DiT derives from :class:`DualStreamStack` (an ``nn.Module`` with ``double_blocks`` and
``single_blocks``) and calls :meth:`DualStreamStack.run_blocks` with the arguments its blocks take between the
streams and the attention context: FLUX.1's blocks take ``(vec, pe)``, FLUX.2's ``(pe, mod_img, mod_txt)`` and
``(pe, mod_single)``. The loop is the families' former code, unchanged (no extra copies, no per-layer hooks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diffstudio.dit.extensions import BlockResidualHook
from diffstudio.nn import DEFAULT_PROCESSOR, AttentionContext, AttentionProcessor, RMSNorm

_T = TypeVar("_T")


class DualStreamStack(nn.Module):
    """Base of a DiT with ``double_blocks`` then ``single_blocks`` (each block has a processor slot).

    Memory metadata (read by VRAM policies and trainers, see ``diffstudio.vram.metadata``): ``repeated_blocks``
    names the ModuleLists of identical blocks, ``memory_leaves`` the layers whose weights are only read in their
    own forward; a family adds ``keep_in_high_precision``.
    """

    repeated_blocks: ClassVar[tuple[str, ...]] = ("double_blocks", "single_blocks")
    memory_leaves: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, RMSNorm)
    no_split_modules: ClassVar[tuple[str, ...]] = ("DoubleStreamBlock", "SingleStreamBlock")
    supports_gradient_checkpointing: ClassVar[bool] = True
    double_blocks: nn.ModuleList
    single_blocks: nn.ModuleList
    use_gradient_checkpointing: bool

    @property
    def block_names(self) -> list[str]:
        """``double_0 .. double_{N-1}, single_0 .. single_{M-1}``: the keys of per-block extension inputs."""
        return [f"double_{i}" for i in range(len(self.double_blocks))] + [
            f"single_{i}" for i in range(len(self.single_blocks))
        ]

    def _named_blocks(self) -> Iterable[tuple[str, Any]]:
        for i, double in enumerate(self.double_blocks):
            yield f"double_{i}", double
        for i, single in enumerate(self.single_blocks):
            yield f"single_{i}", single

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

    def check_block_names(self, kv: Mapping[str, Any], skip: frozenset[str]) -> None:
        """Refuse ``kv_extension`` / ``skip_blocks`` names that are not blocks.

        Raises:
            ValueError: An unknown name.
        """
        unknown = sorted((set(kv) | skip) - set(self.block_names))
        if unknown:
            raise ValueError(f"unknown block names {unknown} in kv_extension/skip_blocks; known: double_i, single_i")

    def run_blocks(
        self,
        img: Tensor,
        txt: Tensor,
        double_args: tuple[Any, ...],
        single_args: tuple[Any, ...],
        layout: tuple[int, int, int],
        kv: Mapping[str, tuple[Tensor, Tensor]],
        skip: frozenset[str],
        block_residual: BlockResidualHook | None,
        extras: Mapping[str, Any],
    ) -> Tensor:
        """Run the double then the single blocks; return the image tokens ``(B, L_img + L_ref, D)``.

        Args:
            img: Embedded image tokens ``(B, L_img + L_ref, D)``.
            txt: Embedded text tokens ``(B, L_txt, D)``.
            double_args: What a double block takes after ``(img, txt)`` and before the attention context.
            single_args: What a single block takes after the joint tokens and before the attention context.
            layout: ``(L_txt, L_img, L_ref)``.
            kv: Per-block ``(K, V)`` extensions.
            skip: Block names not to run.
            block_residual: Called after every block with the target-image tokens.
            extras: The attention processors' ``context.extras``.
        """
        txt_len, img_len, ref_len = layout
        for i in range(len(self.double_blocks)):
            if f"double_{i}" not in skip:
                img, txt = self.run_double_block(i, img, txt, double_args, layout, kv, block_residual, extras)
        seq = torch.cat((txt, img), dim=1)  # (B, L_txt + L_img + L_ref, D)
        start = txt_len  # where the image tokens begin in seq
        run = [i for i in range(len(self.single_blocks)) if f"single_{i}" not in skip]
        for i in run:
            ext = kv.get(f"single_{i}")
            context = AttentionContext("single", i, txt_len, img_len, ref_len, kv_len(ext), extras)
            last = i == run[-1]  # its text outputs are never read: it returns the image tokens only
            seq = self.call_block(self.single_blocks[i], seq, *single_args, context, ext, txt_len if last else 0)
            start = 0 if last else txt_len
            if block_residual is not None:
                residual = block_residual("single", i, seq[:, start : start + img_len])
                seq = add_residual(seq, residual, start, img_len)
        return seq[:, start:]

    def run_double_block(
        self,
        i: int,
        img: Tensor,
        txt: Tensor,
        double_args: tuple[Any, ...],
        layout: tuple[int, int, int],
        kv: Mapping[str, tuple[Tensor, Tensor]],
        block_residual: BlockResidualHook | None,
        extras: Mapping[str, Any],
    ) -> tuple[Tensor, Tensor]:
        """Run ``double_i`` with its K/V extension and block residual; its ``(img, txt)`` outputs.

        The arguments are those of :meth:`run_blocks`.
        """
        txt_len, img_len, ref_len = layout
        ext = kv.get(f"double_{i}")
        context = AttentionContext("double", i, txt_len, img_len, ref_len, kv_len(ext), extras)
        img, txt = self.call_block(self.double_blocks[i], img, txt, *double_args, context, ext)
        if block_residual is not None:
            img = add_residual(img, block_residual("double", i, img[:, :img_len]), 0, img_len)
        return img, txt

    def call_block(self, block: Callable[..., _T], *args: Any) -> _T:
        """Call a block, through activation checkpointing when training with it enabled."""
        if self.use_gradient_checkpointing and self.training and torch.is_grad_enabled():
            out: _T = checkpoint(block, *args, use_reentrant=False)
            return out
        return block(*args)


def kv_len(ext: tuple[Tensor, Tensor] | None) -> int:
    """Tokens of a block's K/V extension (0 without one)."""
    return 0 if ext is None else int(ext[0].shape[1])


def check_tokens(
    tokens: Tensor, ids: Tensor, channels: int, what: str, batch: int, axes: int, hint: str = ""
) -> Tensor:
    """Validate ``tokens (B|1, L, channels)`` and ``ids (B|1, L, axes)`` / ``(L, axes)``; return 3-D ids.

    Raises:
        ValueError: A shape or batch size that does not fit.
    """
    if tokens.ndim != 3 or tokens.shape[-1] != channels:
        raise ValueError(f"{what} must have shape (B, L, {channels}){hint}, got {tuple(tokens.shape)}")
    if ids.ndim == 2:
        ids = ids.unsqueeze(0)
    if ids.ndim != 3 or ids.shape[1] != tokens.shape[1] or ids.shape[2] != axes:
        raise ValueError(
            f"{what}_ids must have shape (B, {tokens.shape[1]}, {axes}) for {what} {tuple(tokens.shape)}, "
            f"got {tuple(ids.shape)}"
        )
    for name, size in ((what, tokens.shape[0]), (f"{what}_ids", ids.shape[0])):
        if size not in (1, batch):
            raise ValueError(f"{name} has batch size {size}, expected 1 or {batch}")
    return ids


def per_sample(values: Tensor, batch: int, what: str) -> Tensor:
    """Accept ``(B,)``, ``(1,)`` or a 0-d tensor; return ``(B,)``.

    Raises:
        ValueError: Another shape.
    """
    if values.ndim == 0 or values.shape == (1,):
        return values.reshape(1).expand(batch)
    if values.shape != (batch,):
        raise ValueError(f"{what} must have shape ({batch},) or (1,), got {tuple(values.shape)}")
    return values


def cat_ids(first: Tensor, second: Tensor) -> Tensor:
    """Concatenate ids ``(B|1, L1, A)`` and ``(B|1, L2, A)`` along tokens, broadcasting the batch."""
    batch = max(first.shape[0], second.shape[0])
    return torch.cat([first.expand(batch, -1, -1), second.to(first.device).expand(batch, -1, -1)], dim=1)


def add_residual(seq: Tensor, residual: Tensor | None, start: int, length: int) -> Tensor:
    """Add ``residual (B, length, D)`` to ``seq[:, start:start + length]`` without in-place writes.

    Raises:
        ValueError: The residual has another shape.
    """
    if residual is None:
        return seq
    if residual.shape[1:] != (length, seq.shape[2]):
        raise ValueError(f"block residual must have shape (B, {length}, {seq.shape[2]}), got {tuple(residual.shape)}")
    if start == 0 and length == seq.shape[1]:
        return seq + residual
    head, mid, tail = seq[:, :start], seq[:, start : start + length], seq[:, start + length :]
    return torch.cat([head, mid + residual.to(seq.dtype), tail], dim=1)


class StackRun:
    """The block stack of one DiT call, as the ``run`` a :class:`~diffstudio.dit.extensions.StackHook` receives.

    ``run()`` runs every block and returns the image tokens ``(B, L_img + L_ref, D)`` after the last one (what
    ``DualStreamStack.run_blocks`` returns). Step caches read two more things: :meth:`modulated_input` (the first
    double block's modulated image input, TeaCache's estimator) and the split :meth:`first_block` /
    :meth:`rest` (First-Block-Cache); ``first_block()`` then ``rest(...)`` computes exactly what ``run()`` does.

    Args:
        stack: The DiT.
        img: Embedded image tokens ``(B, L_img + L_ref, D)``.
        txt: Embedded text tokens ``(B, L_txt, D)``.
        double_args: What a double block takes after ``(img, txt)`` and before the attention context.
        single_args: What a single block takes after the joint tokens and before the attention context.
        layout: ``(L_txt, L_img, L_ref)``.
        kv: Per-block ``(K, V)`` extensions.
        skip: Block names not to run.
        block_residual: Called after every block with the target-image tokens.
        extras: The attention processors' ``context.extras``.
        modulated: ``() -> (B, L_img + L_ref, D)``: ``(1 + scale) * LayerNorm(img) + shift`` with the first
            double block's image modulation (None: the family offers no estimator input).
    """

    def __init__(
        self,
        stack: DualStreamStack,
        img: Tensor,
        txt: Tensor,
        double_args: tuple[Any, ...],
        single_args: tuple[Any, ...],
        layout: tuple[int, int, int],
        kv: Mapping[str, tuple[Tensor, Tensor]],
        skip: frozenset[str],
        block_residual: BlockResidualHook | None,
        extras: Mapping[str, Any],
        modulated: Callable[[], Tensor] | None = None,
    ) -> None:
        self.stack, self.img, self.txt = stack, img, txt
        self.double_args, self.single_args, self.layout = double_args, single_args, layout
        self.kv, self.skip, self.block_residual, self.extras = kv, skip, block_residual, extras
        self._modulated = modulated

    def __call__(self) -> Tensor:
        """Run every block; the image tokens after the last one, ``(B, L_img + L_ref, D)``."""
        return self.rest(self.img, self.txt, first=True)

    @property
    def has_modulated_input(self) -> bool:
        """Whether :meth:`modulated_input` is available."""
        return self._modulated is not None

    def modulated_input(self) -> Tensor:
        """The first double block's modulated image input ``(B, L_img + L_ref, D)``.

        Raises:
            ValueError: The family gave no estimator input.
        """
        if self._modulated is None:
            raise ValueError("this DiT offers no modulated input of its first double block (StackRun(modulated=))")
        return self._modulated()

    @property
    def can_split(self) -> bool:
        """Whether the stack has a first double block that runs (``double_0`` not skipped)."""
        return len(self.stack.double_blocks) > 0 and "double_0" not in self.skip

    def first_block(self) -> tuple[Tensor, Tensor]:
        """Run ``double_0`` alone (with its K/V extension and block residual); its ``(img, txt)`` outputs."""
        return self.stack.run_double_block(0, self.img, self.txt, self.double_args, self.layout, self.kv,
                                           self.block_residual, self.extras)  # fmt: skip

    def rest(self, img: Tensor, txt: Tensor, *, first: bool = False) -> Tensor:
        """Run the blocks after ``double_0`` from its outputs ``(img, txt)`` (every block when ``first``)."""
        skip = self.skip if first else self.skip | {"double_0"}
        return self.stack.run_blocks(img, txt, self.double_args, self.single_args, self.layout, self.kv, skip,
                                     self.block_residual, self.extras)  # fmt: skip
