"""``FluxControlNet``: a FLUX.1 ControlNet built from the shared self-modulated DiT blocks of :mod:`diffstudio.dit`.

A FLUX ControlNet is a shallow FLUX.1 DiT (N double and M single blocks) whose image input is the noisy latents
plus a zero-initialised projection of the condition tokens (``controlnet_x_embedder``), and whose outputs are
the image tokens after every block, each through its own ``D -> D`` projection (``controlnet_blocks``,
``controlnet_single_blocks``). Union models prepend a learned mode token to the text stream
(``controlnet_mode_embedder``, id 0 position). Inpainting models take 4 extra condition channels (the 2x2-packed
keep mask) after the 64 masked-image latent channels.

Attribute names follow BFL's DiT (``img_in``, ``txt_in``, ``time_in``, ``vector_in``, ``guidance_in``,
``double_blocks``, ``single_blocks``) plus the ControlNet's own names, which are those of diffusers'
``FluxControlNetModel``; :mod:`diffstudio_controlnet.loaders` converts the published diffusers layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from diffstudio.dit.blocks import DoubleStreamBlock, SingleStreamBlock
from diffstudio.dit.layers import TIMESTEP_DIM, EmbedND, MLPEmbedder
from diffstudio.errors import ConfigError
from diffstudio.nn import AttentionContext, DeltaLinear, RMSNorm, timestep_embedding
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class ControlNetParams:
    """Sizes of a FLUX.1 ControlNet.

    Attributes:
        in_channels: Channels of a packed latent token (64).
        cond_channels: Channels of a condition token (64; 68 for inpainting: latents + packed mask).
        vec_in_dim: Pooled CLIP width (768).
        context_in_dim: T5 width (4096).
        hidden_size: Model width ``D``.
        num_heads: Attention heads.
        depth: Double blocks (N).
        depth_single_blocks: Single blocks (M, may be 0).
        mlp_ratio: MLP width over ``D``.
        guidance_embed: Whether ``guidance_in`` exists.
        num_modes: Union modes (0: not a Union model).
        theta: RoPE base.
    """

    in_channels: int = 64
    cond_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 5
    depth_single_blocks: int = 10
    mlp_ratio: float = 4.0
    guidance_embed: bool = True
    num_modes: int = 0
    theta: int = 10_000

    @property
    def head_dim(self) -> int:
        """Channels per head."""
        return self.hidden_size // self.num_heads

    @property
    def axes_dim(self) -> tuple[int, int, int]:
        """RoPE channels per id axis (BFL's FLUX.1 split of the head dim: ``(D/8, rest / 2, rest / 2)``).

        Raises:
            ConfigError: The head dim cannot be split that way into even parts.
        """
        head_dim = self.head_dim
        t, rest = head_dim // 8, head_dim - head_dim // 8
        if head_dim <= 0 or head_dim % 8 or t % 2 or rest % 4:
            raise ConfigError(f"ControlNet head dim {head_dim} cannot be split into even RoPE axes (t, h, w)")
        return t, rest // 2, rest // 2

    @classmethod
    def from_state_dict_shapes(cls, shapes: Shapes) -> ControlNetParams:
        """Read the sizes off BFL-named tensor shapes (after :func:`~diffstudio_controlnet.loaders.to_canonical`).

        Raises:
            ValueError: A needed tensor is missing or the shapes disagree.
        """

        def need(key: str) -> tuple[int, ...]:
            if key not in shapes:
                raise ValueError(f"cannot infer the ControlNet's sizes: tensor {key!r} is missing")
            return tuple(shapes[key])

        hidden, in_channels = need("img_in.weight")
        depth, single = _count_blocks(shapes, "double_blocks"), _count_blocks(shapes, "single_blocks")
        if depth:
            (head_dim,) = need("double_blocks.0.img_attn.norm.query_norm.scale")
            mlp = need("double_blocks.0.img_mlp.0.weight")[0]
        elif single:
            (head_dim,) = need("single_blocks.0.norm.query_norm.scale")
            mlp = need("single_blocks.0.linear2.weight")[1] - hidden
        else:
            raise ValueError("a ControlNet needs at least one double or single block")
        modes = shapes.get("controlnet_mode_embedder.weight")
        return cls(
            in_channels=in_channels,
            cond_channels=need("controlnet_x_embedder.weight")[1],
            vec_in_dim=need("vector_in.in_layer.weight")[1],
            context_in_dim=need("txt_in.weight")[1],
            hidden_size=hidden,
            num_heads=hidden // head_dim,
            depth=depth,
            depth_single_blocks=single,
            mlp_ratio=mlp / hidden,
            guidance_embed="guidance_in.in_layer.weight" in shapes,
            num_modes=0 if modes is None else int(modes[0]),
        )


@dataclass
class ControlNetOutput:
    """Residual stacks of one ControlNet call, already scaled.

    Attributes:
        double: One ``(B, L_img, D)`` tensor per ControlNet double block.
        single: One ``(B, L_img, D)`` tensor per ControlNet single block (image tokens only).
    """

    double: list[Tensor]
    single: list[Tensor]


class FluxControlNet(nn.Module):
    """FLUX.1 ControlNet (plain, Union, Inpainting, Upscaler: they differ only in sizes and the mode embedder).

    Memory metadata as for the family's DiT: blocks stream one at a time, Linear / Embedding / RMSNorm weights
    are leaves (read only in their own forward), norms and the embedders stay in high precision.
    """

    repeated_blocks: ClassVar[tuple[str, ...]] = ("double_blocks", "single_blocks")
    memory_leaves: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, nn.Embedding, RMSNorm)
    no_split_modules: ClassVar[tuple[str, ...]] = ("DoubleStreamBlock", "SingleStreamBlock")
    keep_in_high_precision: ClassVar[tuple[str, ...]] = (
        "*norm*", "time_in.*", "guidance_in.*", "vector_in.*", "controlnet_mode_embedder.*",
    )  # fmt: skip
    supports_gradient_checkpointing: ClassVar[bool] = True

    def __init__(self, params: ControlNetParams) -> None:
        super().__init__()
        self.params = params
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
            [DoubleStreamBlock(h, params.num_heads, params.mlp_ratio, True) for _ in range(params.depth)]
        )
        self.single_blocks = nn.ModuleList(
            [SingleStreamBlock(h, params.num_heads, params.mlp_ratio) for _ in range(params.depth_single_blocks)]
        )
        self.controlnet_blocks = nn.ModuleList([DeltaLinear(h, h) for _ in range(params.depth)])
        self.controlnet_single_blocks = nn.ModuleList([DeltaLinear(h, h) for _ in range(params.depth_single_blocks)])
        self.controlnet_x_embedder = DeltaLinear(params.cond_channels, h)
        if params.num_modes:
            self.controlnet_mode_embedder = nn.Embedding(params.num_modes, h)

    @property
    def is_union(self) -> bool:
        """Whether the model takes a mode id (InstantX Union)."""
        return self.params.num_modes > 0

    @property
    def guidance_embed(self) -> bool:
        """Whether the model embeds a guidance strength."""
        return self.params.guidance_embed

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        cond: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        mode: Tensor | None = None,
        scale: float = 1.0,
    ) -> ControlNetOutput:
        """Residual stacks for the DiT's blocks.

        Args:
            img: Noisy latent tokens ``(B, L_img, in_channels)``.
            img_ids: Their ids ``(B or 1, L_img, 3)`` (or ``(L_img, 3)``).
            cond: Condition tokens ``(B or 1, L_img, cond_channels)`` (VAE latents of the control image, packed;
                for inpainting followed by the packed keep mask).
            txt: T5 tokens ``(B or 1, L_txt, context_in_dim)``.
            txt_ids: Their ids ``(B or 1, L_txt, 3)`` (or ``(L_txt, 3)``).
            timesteps: Times in ``[0, 1]``, ``(B,)``.
            y: Pooled CLIP vector ``(B or 1, vec_in_dim)``.
            guidance: Embedded guidance ``(B,)``; required by models with ``guidance_in``.
            mode: Union mode ids ``(B,)`` or ``(1,)``; required by Union models.
            scale: Factor applied to every residual.

        Returns:
            The scaled residual stacks (:class:`ControlNetOutput`).
        """
        batch = img.shape[0]
        dtype = img.dtype
        txt, y = txt.expand(batch, -1, -1), y.expand(batch, -1)
        img_ids = _batched_ids(img_ids, batch)
        txt_ids = _batched_ids(txt_ids, batch)
        vec = self.time_in(timestep_embedding(timesteps.to(dtype).expand(batch), TIMESTEP_DIM))
        if self.guidance_embed:
            if guidance is None:
                raise ValueError("this ControlNet embeds guidance: pass guidance (B,) (embedded_guidance)")
            vec = vec + self.guidance_in(timestep_embedding(guidance.to(dtype).expand(batch), TIMESTEP_DIM))
        vec = vec + self.vector_in(y.to(dtype))
        x = self.img_in(img) + self.controlnet_x_embedder(cond.to(dtype).expand(batch, -1, -1))
        t = self.txt_in(txt.to(dtype))
        if self.is_union:
            if mode is None:
                raise ValueError("this is a Union ControlNet: pass a mode id (ControlNetInput.processor_id)")
            token = self.controlnet_mode_embedder(mode.to(torch.long).expand(batch))[:, None]  # (B, 1, D)
            t = torch.cat([token.to(t.dtype), t], dim=1)
            txt_ids = torch.cat([txt_ids[:, :1], txt_ids], dim=1)
        pe = self.pe_embedder(torch.cat([txt_ids, img_ids.to(txt_ids.device)], dim=1))
        txt_len, img_len = t.shape[1], x.shape[1]
        double: list[Tensor] = []
        for i, block in enumerate(self.double_blocks):
            context = AttentionContext("double", i, txt_len, img_len)
            x, t = self._call(block, x, t, vec, pe, context)
            double.append(cast(Tensor, self.controlnet_blocks[i](x)) * scale)
        seq = torch.cat([t, x], dim=1)
        single: list[Tensor] = []
        for i, block in enumerate(self.single_blocks):
            context = AttentionContext("single", i, txt_len, img_len)
            seq = self._call(block, seq, vec, pe, context)
            single.append(cast(Tensor, self.controlnet_single_blocks[i](seq[:, txt_len:])) * scale)
        return ControlNetOutput(double, single)

    def _call(self, block: nn.Module, *args: Any) -> Any:
        if self.use_gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


def _count_blocks(shapes: Shapes, prefix: str) -> int:
    """Number of ``{prefix}.{i}.*`` blocks (indices contiguous from 0).

    Raises:
        ValueError: The indices have gaps.
    """
    indices = {int(k.split(".")[1]) for k in shapes if k.startswith(f"{prefix}.") and k.split(".")[1].isdigit()}
    if indices != set(range(len(indices))):
        raise ValueError(f"cannot infer the ControlNet's sizes: {prefix} indices are not contiguous: {sorted(indices)}")
    return len(indices)


def _batched_ids(ids: Tensor, batch: int) -> Tensor:
    """``(L, 3)`` / ``(1|B, L, 3)`` ids to ``(B, L, 3)``."""
    if ids.ndim == 2:
        ids = ids[None]
    return ids.expand(batch, -1, -1)
