"""Hyper-parameters of the FLUX.2 DiT and autoencoder, with the official presets.

Field names follow BFL's ``flux2`` reference code. Sizes can also be read off a checkpoint's tensor shapes
(``from_state_dict_shapes``), keyed by the BFL (canonical) names.

Errors are typed: sizes that cannot be read off a checkpoint raise :class:`ParamsShapeError` (a
:class:`~diffstudio.errors.CheckpointError` naming the file and the tensor), inconsistent hand-given sizes raise
:class:`~diffstudio.errors.ConfigError`; both are ``ValueError`` subclasses too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from diffstudio.errors import CheckpointError, ConfigError

Shapes = Mapping[str, Sequence[int]]
"""Tensor name -> shape, e.g. read from a safetensors header without loading data."""

TIMESTEP_DIM = 256
"""Width of the sinusoidal timestep/guidance embedding fed to ``time_in`` / ``guidance_in``."""


class ParamsShapeError(CheckpointError, ValueError):
    """A checkpoint's tensor shapes do not give consistent FLUX.2 sizes (a tensor is missing or has another rank)."""


def _fail(what: str, source: str, problem: str) -> ParamsShapeError:
    return ParamsShapeError(
        f"Cannot read the {what} sizes off {source}: {problem}. The file is damaged or is not a {what} checkpoint "
        "(check the file, or pass another one)."
    )


def _require(
    shapes: Shapes, key: str, ndim: int, what: str = "FLUX.2", source: str = "the checkpoint"
) -> tuple[int, ...]:
    if key not in shapes:
        raise _fail(what, source, f"tensor {key!r} is missing (BFL key names expected)")
    shape = tuple(int(s) for s in shapes[key])
    if len(shape) != ndim:
        raise _fail(what, source, f"tensor {key!r} has shape {list(shape)}, expected {ndim} dimension(s)")
    return shape


def _count_blocks(shapes: Shapes, prefix: str, what: str = "FLUX.2", source: str = "the checkpoint") -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    indices = {int(m.group(1)) for k in shapes if (m := pattern.match(k))}
    if indices and indices != set(range(max(indices) + 1)):
        shown = sorted(indices)
        raise _fail(what, source, f"{prefix} indices are not contiguous: {shown[:20]}{' ...' * (len(shown) > 20)}")
    return len(indices)


@dataclass
class Flux2Params:
    """Sizes of a FLUX.2 DiT (``Flux2``).

    Attributes:
        in_channels: Channels of a packed latent token (128: 32 latent channels x 2 x 2 patch).
        context_in_dim: Width of a text-encoder token (3 stacked hidden states).
        hidden_size: Model width ``D = num_heads * head_dim``.
        num_heads: Attention heads.
        depth: Double-stream blocks.
        depth_single_blocks: Single-stream blocks.
        axes_dim: RoPE channels per id axis (t, h, w, l); the sum is the head dim.
        theta: RoPE base.
        mlp_ratio: SwiGLU hidden width over ``hidden_size``.
        use_guidance_embed: Whether ``guidance_in`` exists (guidance-distilled FLUX.2 [dev]).
    """

    in_channels: int = 128
    context_in_dim: int = 15360
    hidden_size: int = 6144
    num_heads: int = 48
    depth: int = 8
    depth_single_blocks: int = 48
    axes_dim: tuple[int, ...] = (32, 32, 32, 32)
    theta: int = 2000
    mlp_ratio: float = 3.0
    use_guidance_embed: bool = True

    def __post_init__(self) -> None:
        self.axes_dim = tuple(self.axes_dim)
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
        """SwiGLU hidden width (the gated half)."""
        return int(self.hidden_size * self.mlp_ratio)

    @classmethod
    def preset(cls, name: str) -> Flux2Params:
        """Return a copy of an official preset (see :data:`FLUX2_PRESETS`)."""
        if name not in FLUX2_PRESETS:
            raise ConfigError(f"unknown FLUX.2 preset {name!r}; known: {sorted(FLUX2_PRESETS)}")
        return replace(FLUX2_PRESETS[name])

    @classmethod
    def from_state_dict_shapes(cls, shapes: Shapes, *, source: str = "the checkpoint") -> Flux2Params:
        """Infer the sizes from BFL-named tensor shapes (no tensor data needed).

        Depths come from block indices, widths from weight shapes, the head dim from the QK-norm scale size.
        ``axes_dim`` splits the head dim into 4 equal axes and ``theta`` is 2000 (neither is stored).

        Args:
            shapes: Tensor name -> shape.
            source: The file or folder the shapes come from, for messages.

        Raises:
            ParamsShapeError: A needed key is missing, has another rank, or the shapes are inconsistent.
        """

        def need(key: str, ndim: int) -> tuple[int, ...]:
            return _require(shapes, key, ndim, source=source)

        hidden, in_channels = need("img_in.weight", 2)
        context_hidden, context_in_dim = need("txt_in.weight", 2)
        depth = _count_blocks(shapes, "double_blocks", source=source)
        depth_single = _count_blocks(shapes, "single_blocks", source=source)
        if depth:
            (head_dim,) = need("double_blocks.0.img_attn.norm.query_norm.scale", 1)
            mlp_hidden = need("double_blocks.0.img_mlp.2.weight", 2)[1]
        elif depth_single:
            (head_dim,) = need("single_blocks.0.norm.query_norm.scale", 1)
            mlp_hidden = need("single_blocks.0.linear2.weight", 2)[1] - hidden
        else:
            raise _fail("FLUX.2", source, "no double_blocks.* or single_blocks.* tensors")
        time_in = need("time_in.in_layer.weight", 2)
        if hidden <= 0 or context_hidden != hidden or time_in != (hidden, TIMESTEP_DIM):
            raise _fail(
                "FLUX.2", source, f"inconsistent widths: img_in {hidden}, txt_in {context_hidden}, time_in {time_in}"
            )
        if head_dim <= 0 or hidden % head_dim or head_dim % 8:
            raise _fail(
                "FLUX.2", source, f"head dim {head_dim} (from the QK-norm scale) does not fit hidden size {hidden}"
            )
        try:
            params = cls(
                in_channels=in_channels,
                context_in_dim=context_in_dim,
                hidden_size=hidden,
                num_heads=hidden // head_dim,
                depth=depth,
                depth_single_blocks=depth_single,
                axes_dim=(head_dim // 4,) * 4,
                mlp_ratio=mlp_hidden / hidden,
                use_guidance_embed="guidance_in.in_layer.weight" in shapes,
            )
        except ConfigError as exc:
            raise _fail("FLUX.2", source, str(exc)) from None
        if params.mlp_hidden_dim != mlp_hidden:
            raise _fail("FLUX.2", source, f"MLP width {mlp_hidden} is not representable with hidden size {hidden}")
        return params


FLUX2_PRESETS: dict[str, Flux2Params] = {
    "dev": Flux2Params(),
    "klein-4b": Flux2Params(
        context_in_dim=7680,
        hidden_size=3072,
        num_heads=24,
        depth=5,
        depth_single_blocks=20,
        use_guidance_embed=False,
    ),
    "klein-9b": Flux2Params(
        context_in_dim=12288,
        hidden_size=4096,
        num_heads=32,
        depth=8,
        depth_single_blocks=24,
        use_guidance_embed=False,
    ),
}
# The base (undistilled) klein checkpoints share the distilled ones' shapes.
FLUX2_PRESETS["klein-base-4b"] = replace(FLUX2_PRESETS["klein-4b"])
FLUX2_PRESETS["klein-base-9b"] = replace(FLUX2_PRESETS["klein-9b"])


@dataclass
class AutoEncoderParams:
    """Sizes of the FLUX.2 autoencoder (``Flux2AutoEncoder``).

    Attributes:
        resolution: Nominal training resolution (informational).
        in_channels: Image channels.
        ch: Base channel count.
        out_ch: Decoded image channels.
        ch_mult: Channel multiplier per resolution level; each level but the last halves the size.
        num_res_blocks: Resnet blocks per encoder level (the decoder has one more).
        z_channels: Latent channels before patchification (32).
        norm_groups: GroupNorm groups.
        patch_size: Latent patchification (2 x 2) before the BatchNorm normalisation.
        bn_eps: Epsilon of the latent BatchNorm statistics.
    """

    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 32
    norm_groups: int = 32
    patch_size: tuple[int, int] = field(default=(2, 2))
    bn_eps: float = 1e-4

    def __post_init__(self) -> None:
        self.ch_mult = tuple(self.ch_mult)
        self.patch_size = (int(self.patch_size[0]), int(self.patch_size[1]))
        bad = [self.ch * m for m in self.ch_mult if self.norm_groups <= 0 or (self.ch * m) % self.norm_groups]
        if bad:
            raise ConfigError(f"channel counts {bad} are not divisible by norm_groups {self.norm_groups}")

    @property
    def latent_channels(self) -> int:
        """Channels of a normalised, patchified latent (``z_channels * 2 * 2`` = 128)."""
        return self.z_channels * math.prod(self.patch_size)

    @property
    def downsample_factor(self) -> int:
        """Image pixels per normalised latent pixel along one side (16 for the official AE)."""
        return (1 << (len(self.ch_mult) - 1)) * self.patch_size[0]

    @classmethod
    def from_state_dict_shapes(cls, shapes: Shapes, *, source: str = "the checkpoint") -> AutoEncoderParams:
        """Infer the sizes from BFL-named autoencoder tensor shapes (``ae.safetensors`` layout).

        Raises:
            ParamsShapeError: A needed key is missing, has another rank, or the shapes are inconsistent.
        """
        what = "FLUX.2 AE"

        def need(key: str, ndim: int = 4) -> tuple[int, ...]:
            return _require(shapes, key, ndim, what, source)

        ch, in_channels = need("encoder.conv_in.weight")[:2]
        out_ch = need("decoder.conv_out.weight")[0]
        two_z = need("encoder.conv_out.weight")[0]
        levels = _count_blocks(shapes, "encoder.down", what, source)
        if levels == 0:
            raise _fail(what, source, "no encoder.down.* tensors")
        if ch <= 0 or two_z < 2:
            raise _fail(what, source, f"encoder.conv_in has {ch} and encoder.conv_out {two_z} output channels")
        ch_mult = tuple(need(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in range(levels))
        num_res_blocks = _count_blocks(shapes, "encoder.down.0.block", what, source)
        (bn_channels,) = need("bn.running_mean", 1)
        z = two_z // 2
        if bn_channels % z:
            raise _fail(what, source, f"latent BatchNorm has {bn_channels} channels, not a multiple of z_channels {z}")
        side = math.isqrt(bn_channels // z)
        try:
            return cls(
                in_channels=in_channels,
                ch=ch,
                out_ch=out_ch,
                ch_mult=ch_mult,
                num_res_blocks=num_res_blocks,
                z_channels=z,
                patch_size=(side, side),
            )
        except ConfigError as exc:
            raise _fail(what, source, str(exc)) from None
