"""Hyper-parameters of the FLUX.1 DiT and autoencoder, with the official presets.

Field names follow BFL's ``flux`` reference code (``FluxParams``, ``AutoEncoderParams``). Sizes are read off a
checkpoint's tensor shapes with ``from_state_dict_shapes`` (BFL, i.e. canonical, names); nothing is looked up
in a table of hashes.

Errors are typed: sizes that cannot be read off a checkpoint raise :class:`ParamsShapeError` (a
:class:`~diffstudio.errors.CheckpointError` naming the file and the tensor), inconsistent hand-given sizes raise
:class:`~diffstudio.errors.ConfigError`; both are ``ValueError`` subclasses too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from diffstudio.dit.params import DitParams
from diffstudio.errors import ConfigError
from diffstudio.loading.component_config import ComponentConfig
from diffstudio.loading.shapes import LdmAutoEncoderParams, ParamsShapeError, ShapeProbe, Shapes, count_blocks
from diffstudio.loading.shapes import ldm_autoencoder_sizes as _ldm_autoencoder_sizes

__all__ = [
    "FLUX1_PRESETS",
    "TIMESTEP_DIM",
    "AutoEncoderParams",
    "FluxParams",
    "ParamsShapeError",
    "Shapes",
    "count_blocks",
    "default_axes_dim",
]

TIMESTEP_DIM = 256
"""Width of the sinusoidal timestep/guidance embedding fed to ``time_in`` / ``guidance_in``."""


def default_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """RoPE channels per id axis ``(t, h, w)`` for a head dim: ``(16, 56, 56)`` for 128.

    The split is not stored in checkpoints (a diffusers ``config.json`` carries it as ``axes_dims_rope``). BFL's
    rule is the fallback: the time axis gets ``head_dim / 8`` channels and the two spatial axes share the rest
    equally; every part must be even.

    Raises:
        ConfigError: The head dim cannot be split that way (e.g. 16: ``(2, 7, 7)``); a ``ValueError``.
    """
    t = head_dim // 8
    rest = head_dim - t
    if head_dim <= 0 or head_dim % 8 or t % 2 or rest % 4:
        raise ConfigError(f"head dim {head_dim} cannot be split into even RoPE axes (t, h, w) = (D/8, ...)")
    return t, rest // 2, rest // 2


@dataclass
class FluxParams(DitParams):
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
        axes_dim: RoPE channels per id axis ``(t, h, w)``; the sum is the head dim. Not stored in BFL files
            (diffusers ``axes_dims_rope``): the config beside the weights or ``ModelConfig(config=)`` gives it,
            else :func:`default_axes_dim` guesses it.
        theta: RoPE base (10000; diffusers fixes it too).
        qkv_bias: Whether the fused q/k/v projections have biases (True in every official model).
        guidance_embed: Whether ``guidance_in`` exists (guidance-distilled dev / Kontext; not schnell).
    """

    FAMILY: ClassVar[str] = "FLUX.1"
    DIFFUSERS_CLASSES: ClassVar[tuple[str, ...]] = ("FluxTransformer2DModel",)
    CONFIG_FIELDS: ClassVar[Mapping[str, tuple[str, str]]] = {
        "in_channels": ("in_channels", "int"),
        "out_channels": ("out_channels", "int"),
        "pooled_projection_dim": ("vec_in_dim", "int"),
        "joint_attention_dim": ("context_in_dim", "int"),
        "num_attention_heads": ("num_heads", "int"),
        "num_layers": ("depth", "int"),
        "num_single_layers": ("depth_single_blocks", "int"),
        "axes_dims_rope": ("axes_dim", "ints"),
        "guidance_embeds": ("guidance_embed", "bool"),
    }

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

    @classmethod
    def presets(cls) -> Mapping[str, FluxParams]:
        """The official presets, :data:`FLUX1_PRESETS`."""
        return FLUX1_PRESETS

    @classmethod
    def from_state_dict_shapes(
        cls, shapes: Shapes, *, source: str = "the checkpoint", config: ComponentConfig | None = None
    ) -> FluxParams:
        """Infer the sizes from BFL-named tensor shapes (no tensor data needed), the config first.

        Every field the component's config carries (the diffusers ``config.json`` beside the weights, or
        ``ModelConfig(config=)``) is taken from it and checked against the shapes; depths come from block indices,
        widths from weight shapes, the head dim from the QK-norm scale. ``axes_dim``, which no BFL file stores,
        falls back to :func:`default_axes_dim`; ``theta`` (10000) is not stored.

        Args:
            shapes: Tensor name -> shape.
            source: The file or folder the shapes come from, for messages.
            config: The component's configuration (from
                :func:`~diffstudio.loading.component_config.read_component_config`).

        Raises:
            ParamsShapeError: A needed key is missing, has another rank, the shapes are inconsistent, or they
                contradict the config.
            SizesNotStoredError: No config gives the RoPE split and the head dim has no default one; the message
                says how to pass it.
        """
        probe = ShapeProbe(shapes, "FLUX.1", source)
        hidden, in_channels = probe.need("img_in.weight", 2)
        if hidden <= 0:
            raise probe.fail(f"img_in.weight has shape {[hidden, in_channels]}")
        out_channels = probe.need("final_layer.linear.weight", 2)[0]
        vec_in_dim = probe.need("vector_in.in_layer.weight", 2)[1]
        context_in_dim = probe.need("txt_in.weight", 2)[1]
        depth, depth_single, head_dim, mlp_hidden = cls.read_blocks(probe, hidden, ("img_mlp.0.weight", 0))
        qkv_bias = "double_blocks.0.img_attn.qkv.bias" in probe if depth else True
        inferred = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "vec_in_dim": vec_in_dim,
            "context_in_dim": context_in_dim,
            "hidden_size": hidden,
            "mlp_ratio": mlp_hidden / hidden,
            "num_heads": hidden // head_dim,
            "depth": depth,
            "depth_single_blocks": depth_single,
            "qkv_bias": qkv_bias,
            "guidance_embed": "guidance_in.in_layer.weight" in probe,
        }
        return cls.settle(probe, inferred, config, {"axes_dim": default_axes_dim}, mlp_hidden)


FLUX1_PRESETS: dict[str, FluxParams] = {
    "dev": FluxParams(),
    "schnell": FluxParams(guidance_embed=False),
    "kontext-dev": FluxParams(),
    "fill-dev": FluxParams(in_channels=384),
}


@dataclass
class AutoEncoderParams(LdmAutoEncoderParams):
    """Sizes of the FLUX.1 autoencoder (``AutoEncoder``, BFL's ``ae.safetensors``).

    Attributes:
        z_channels: Latent channels (16).
        scale_factor: Latent scaling: ``z = scale_factor * (mean - shift_factor)``.
        shift_factor: Latent shift.

    The other sizes are :class:`~diffstudio.loading.shapes.LdmAutoEncoderParams`'.
    """

    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

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
        config: ComponentConfig | None = None,
    ) -> AutoEncoderParams:
        """Infer the sizes from BFL-named autoencoder tensor shapes (``ae.safetensors`` layout), the config first.

        The latent scale and shift and the GroupNorm groups are not stored in the weights; a diffusers
        ``config.json`` (``scaling_factor``, ``shift_factor``, ``norm_num_groups``), when given, wins over the
        keyword values, which default to FLUX.1's.

        Raises:
            ParamsShapeError: A needed key is missing, has another rank, or the shapes are inconsistent.
        """
        probe = ShapeProbe(shapes, "FLUX.1 AE", source)
        sizes = _ldm_autoencoder_sizes(probe)
        if config is not None:
            scale_factor = config.typed("scaling_factor", "float", scale_factor)
            shift_factor = config.typed("shift_factor", "float", shift_factor)
            norm_groups = config.typed("norm_num_groups", "int", norm_groups)
        try:
            return cls(**sizes, scale_factor=scale_factor, shift_factor=shift_factor, norm_groups=norm_groups)
        except ConfigError as exc:
            raise probe.fail(str(exc)) from None
