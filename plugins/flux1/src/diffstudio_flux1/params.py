"""Hyper-parameters of the FLUX.1 DiT and autoencoder, with the official presets.

Field names follow BFL's ``flux`` reference code (``FluxParams``, ``AutoEncoderParams``). Sizes are read off a
checkpoint's tensor shapes with ``from_state_dict_shapes`` (BFL, i.e. canonical, names); nothing is looked up
in a table of hashes.

Errors are typed: sizes that cannot be read off a checkpoint raise :class:`ParamsShapeError` (a
:class:`~diffstudio.errors.CheckpointError` naming the file and the tensor), inconsistent hand-given sizes raise
:class:`~diffstudio.errors.ConfigError`; both are ``ValueError`` subclasses too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from diffstudio.errors import CheckpointError, ConfigError

Shapes = Mapping[str, Sequence[int]]
"""Tensor name -> shape, e.g. read from a safetensors header without loading data."""

TIMESTEP_DIM = 256
"""Width of the sinusoidal timestep/guidance embedding fed to ``time_in`` / ``guidance_in``."""


class ParamsShapeError(CheckpointError, ValueError):
    """A checkpoint's tensor shapes do not give consistent FLUX.1 sizes (a tensor is missing or has another rank)."""


def _fail(what: str, source: str, problem: str) -> ParamsShapeError:
    return ParamsShapeError(
        f"Cannot read the {what} sizes off {source}: {problem}. The file is damaged or is not a {what} checkpoint "
        "(check the file, or pass another one)."
    )


def _require(
    shapes: Shapes, key: str, ndim: int, what: str = "FLUX.1", source: str = "the checkpoint"
) -> tuple[int, ...]:
    if key not in shapes:
        raise _fail(what, source, f"tensor {key!r} is missing (BFL key names expected)")
    shape = tuple(int(s) for s in shapes[key])
    if len(shape) != ndim:
        raise _fail(what, source, f"tensor {key!r} has shape {list(shape)}, expected {ndim} dimension(s)")
    return shape


def count_blocks(shapes: Shapes, prefix: str, source: str = "the checkpoint") -> int:
    """Number of ``{prefix}.{i}.*`` blocks; the indices must be contiguous from 0.

    Raises:
        ParamsShapeError: The indices have gaps.
    """
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    indices = {int(m.group(1)) for k in shapes if (m := pattern.match(k))}
    if indices and indices != set(range(max(indices) + 1)):
        shown = sorted(indices)
        raise _fail("FLUX.1", source, f"{prefix} indices are not contiguous: {shown[:20]}{' ...' * (len(shown) > 20)}")
    return len(indices)


def default_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """RoPE channels per id axis ``(t, h, w)`` for a head dim: ``(16, 56, 56)`` for 128.

    The split is not stored in checkpoints. BFL's rule is kept: the time axis gets ``head_dim / 8`` channels
    and the two spatial axes share the rest equally; every part must be even.

    Raises:
        ConfigError: The head dim cannot be split that way (e.g. 16: ``(2, 7, 7)``); a ``ValueError``.
    """
    t = head_dim // 8
    rest = head_dim - t
    if head_dim <= 0 or head_dim % 8 or t % 2 or rest % 4:
        raise ConfigError(f"head dim {head_dim} cannot be split into even RoPE axes (t, h, w) = (D/8, ...)")
    return t, rest // 2, rest // 2


@dataclass
class FluxParams:
    """Sizes of a FLUX.1 DiT (``Flux``).

    Attributes:
        in_channels: Channels of a packed input token: 64 (16 latent channels x 2 x 2), 384 for Fill (latents
            plus channel-concatenated conditioning).
        out_channels: Channels of a predicted velocity token (64).
        vec_in_dim: Width of the pooled CLIP vector (768).
        context_in_dim: Width of a T5 token (4096).
        hidden_size: Model width ``D = num_heads * head_dim``.
        mlp_ratio: GELU MLP hidden width over ``hidden_size``.
        num_heads: Attention heads.
        depth: Double-stream blocks.
        depth_single_blocks: Single-stream blocks.
        axes_dim: RoPE channels per id axis ``(t, h, w)``; the sum is the head dim.
        theta: RoPE base.
        qkv_bias: Whether the fused q/k/v projections have biases (True in every official model).
        guidance_embed: Whether ``guidance_in`` exists (guidance-distilled dev / Kontext; not schnell).
    """

    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True

    def __post_init__(self) -> None:
        self.axes_dim = tuple(int(a) for a in self.axes_dim)
        if self.num_heads <= 0 or self.hidden_size <= 0 or self.hidden_size % self.num_heads != 0:
            raise ConfigError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ConfigError(f"axes_dim {self.axes_dim} must sum to the head dim {self.head_dim}")
        if any(d % 2 for d in self.axes_dim):
            raise ConfigError(f"every entry of axes_dim {self.axes_dim} must be even")

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        """Hidden width of the GELU MLPs."""
        return int(self.hidden_size * self.mlp_ratio)

    @classmethod
    def preset(cls, name: str) -> FluxParams:
        """Return a copy of an official preset (see :data:`FLUX1_PRESETS`)."""
        if name not in FLUX1_PRESETS:
            raise ConfigError(f"unknown FLUX.1 preset {name!r}; known: {sorted(FLUX1_PRESETS)}")
        return replace(FLUX1_PRESETS[name])

    @classmethod
    def from_state_dict_shapes(cls, shapes: Shapes, *, source: str = "the checkpoint") -> FluxParams:
        """Infer the sizes from BFL-named tensor shapes (no tensor data needed).

        Depths come from block indices, widths from weight shapes, the head dim from the QK-norm scale,
        ``axes_dim`` from :func:`default_axes_dim`; ``theta`` (10000) is not stored.

        Args:
            shapes: Tensor name -> shape.
            source: The file or folder the shapes come from, for messages.

        Raises:
            ParamsShapeError: A needed key is missing, has another rank, or the shapes are inconsistent.
        """

        def need(key: str, ndim: int) -> tuple[int, ...]:
            return _require(shapes, key, ndim, source=source)

        hidden, in_channels = need("img_in.weight", 2)
        if hidden <= 0:
            raise _fail("FLUX.1", source, f"img_in.weight has shape {[hidden, in_channels]}")
        out_channels = need("final_layer.linear.weight", 2)[0]
        vec_in_dim = need("vector_in.in_layer.weight", 2)[1]
        context_in_dim = need("txt_in.weight", 2)[1]
        depth = count_blocks(shapes, "double_blocks", source)
        depth_single = count_blocks(shapes, "single_blocks", source)
        if depth:
            (head_dim,) = need("double_blocks.0.img_attn.norm.query_norm.scale", 1)
            mlp_hidden = need("double_blocks.0.img_mlp.0.weight", 2)[0]
            qkv_bias = "double_blocks.0.img_attn.qkv.bias" in shapes
        elif depth_single:
            (head_dim,) = need("single_blocks.0.norm.query_norm.scale", 1)
            mlp_hidden = need("single_blocks.0.linear2.weight", 2)[1] - hidden
            qkv_bias = True
        else:
            raise _fail("FLUX.1", source, "no double_blocks.* or single_blocks.* tensors")
        if head_dim <= 0 or hidden % head_dim:
            raise _fail(
                "FLUX.1", source, f"head dim {head_dim} (from the QK-norm scale) does not divide hidden size {hidden}"
            )
        try:
            params = cls(
                in_channels=in_channels,
                out_channels=out_channels,
                vec_in_dim=vec_in_dim,
                context_in_dim=context_in_dim,
                hidden_size=hidden,
                mlp_ratio=mlp_hidden / hidden,
                num_heads=hidden // head_dim,
                depth=depth,
                depth_single_blocks=depth_single,
                axes_dim=default_axes_dim(head_dim),
                qkv_bias=qkv_bias,
                guidance_embed="guidance_in.in_layer.weight" in shapes,
            )
        except ConfigError as exc:
            raise _fail("FLUX.1", source, str(exc)) from None
        if params.mlp_hidden_dim != mlp_hidden:
            raise _fail("FLUX.1", source, f"MLP width {mlp_hidden} is not representable with hidden size {hidden}")
        return params


FLUX1_PRESETS: dict[str, FluxParams] = {
    "dev": FluxParams(),
    "schnell": FluxParams(guidance_embed=False),
    "kontext-dev": FluxParams(),
    "fill-dev": FluxParams(in_channels=384),
}


@dataclass
class AutoEncoderParams:
    """Sizes of the FLUX.1 autoencoder (``AutoEncoder``, BFL's ``ae.safetensors``).

    Attributes:
        resolution: Nominal training resolution (informational).
        in_channels: Image channels.
        ch: Base channel count.
        out_ch: Decoded image channels.
        ch_mult: Channel multiplier per level; each level but the last halves the size.
        num_res_blocks: Resnet blocks per encoder level (the decoder has one more).
        z_channels: Latent channels (16).
        scale_factor: Latent scaling: ``z = scale_factor * (mean - shift_factor)``.
        shift_factor: Latent shift.
        norm_groups: GroupNorm groups.
    """

    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    norm_groups: int = 32

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        bad = [self.ch * m for m in self.ch_mult if self.norm_groups <= 0 or (self.ch * m) % self.norm_groups]
        if bad:
            raise ConfigError(f"channel counts {bad} are not divisible by norm_groups {self.norm_groups}")

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along one side (8 for the official AE)."""
        return 1 << (len(self.ch_mult) - 1)

    @classmethod
    def from_state_dict_shapes(
        cls,
        shapes: Shapes,
        *,
        scale_factor: float = 0.3611,
        shift_factor: float = 0.1159,
        norm_groups: int = 32,
        source: str = "the checkpoint",
    ) -> AutoEncoderParams:
        """Infer the sizes from BFL-named autoencoder tensor shapes (``ae.safetensors`` layout).

        The latent scale and shift are not stored in ``ae.safetensors``; FLUX.1's values are the defaults
        (a diffusers ``config.json`` carries them, see the loaders).

        Raises:
            ParamsShapeError: A needed key is missing, has another rank, or the shapes are inconsistent.
        """
        what = "FLUX.1 AE"

        def need(key: str) -> tuple[int, ...]:
            return _require(shapes, key, 4, what, source)

        ch, in_channels = need("encoder.conv_in.weight")[:2]
        out_ch = need("decoder.conv_out.weight")[0]
        two_z = need("encoder.conv_out.weight")[0]
        levels = count_blocks(shapes, "encoder.down", source)
        if levels == 0:
            raise _fail(what, source, "no encoder.down.* tensors")
        if ch <= 0:
            raise _fail(what, source, f"encoder.conv_in.weight has {ch} output channels")
        mult = tuple(need(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in range(levels))
        try:
            return cls(
                in_channels=in_channels,
                ch=ch,
                out_ch=out_ch,
                ch_mult=mult,
                num_res_blocks=count_blocks(shapes, "encoder.down.0.block", source),
                z_channels=two_z // 2,
                scale_factor=scale_factor,
                shift_factor=shift_factor,
                norm_groups=norm_groups,
            )
        except ConfigError as exc:
            raise _fail(what, source, str(exc)) from None
