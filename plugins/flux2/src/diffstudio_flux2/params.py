"""Hyper-parameters of the FLUX.2 DiT and autoencoder, with the official presets.

Field names follow BFL's ``flux2`` reference code. Sizes can also be read off a checkpoint's tensor shapes
(``from_state_dict_shapes``), keyed by the BFL (canonical) names.

Errors are typed: sizes that cannot be read off a checkpoint raise :class:`ParamsShapeError` (a
:class:`~diffstudio.errors.CheckpointError` naming the file and the tensor), inconsistent hand-given sizes raise
:class:`~diffstudio.errors.ConfigError`; both are ``ValueError`` subclasses too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from diffstudio.dit.params import DitParams
from diffstudio.errors import ConfigError
from diffstudio.loading.component_config import ComponentConfig
from diffstudio.loading.shapes import (
    LdmAutoEncoderParams,
    ParamsShapeError,
    ShapeProbe,
    Shapes,
    ldm_autoencoder_sizes,
)

__all__ = [
    "FLUX2_PRESETS",
    "TIMESTEP_DIM",
    "AutoEncoderParams",
    "Flux2Params",
    "ParamsShapeError",
    "Shapes",
    "default_axes_dim",
]

TIMESTEP_DIM = 256
"""Width of the sinusoidal timestep/guidance embedding fed to ``time_in`` / ``guidance_in``."""


def default_axes_dim(head_dim: int) -> tuple[int, int, int, int]:
    """RoPE channels per id axis ``(t, h, w, l)`` for a head dim: four equal parts, ``(32, 32, 32, 32)`` for 128.

    The split is not stored in BFL files (a diffusers ``config.json`` carries it as ``axes_dims_rope``); this is
    the official models' rule, the fallback.

    Raises:
        ConfigError: The head dim cannot be split into four even parts; a ``ValueError``.
    """
    if head_dim <= 0 or head_dim % 8:
        raise ConfigError(f"head dim {head_dim} cannot be split into four equal even RoPE axes (t, h, w, l)")
    return (head_dim // 4,) * 4


@dataclass
class Flux2Params(DitParams):
    """Sizes of a FLUX.2 DiT (``Flux2``).

    Attributes:
        in_channels: Channels of a packed latent token (128: 32 latent channels x 2 x 2 patch).
        context_in_dim: Width of a text-encoder token (3 stacked hidden states).
        hidden_size: Model width ``D = num_heads * head_dim``.
        num_heads: Attention heads.
        depth: Double-stream blocks.
        depth_single_blocks: Single-stream blocks.
        axes_dim: RoPE channels per id axis (t, h, w, l); the sum is the head dim. Not stored in BFL files
            (diffusers ``axes_dims_rope``): the config beside the weights or ``ModelConfig(config=)`` gives it,
            else :func:`default_axes_dim` splits the head dim in four.
        theta: RoPE base (2000; diffusers ``rope_theta``, not stored in BFL files).
        mlp_ratio: SwiGLU hidden width over ``hidden_size``.
        use_guidance_embed: Whether ``guidance_in`` exists (guidance-distilled FLUX.2 [dev]).
    """

    FAMILY: ClassVar[str] = "FLUX.2"
    DIFFUSERS_CLASSES: ClassVar[tuple[str, ...]] = ("Flux2Transformer2DModel",)
    CONFIG_FIELDS: ClassVar[Mapping[str, tuple[str, str]]] = {
        "in_channels": ("in_channels", "int"),
        "joint_attention_dim": ("context_in_dim", "int"),
        "num_attention_heads": ("num_heads", "int"),
        "num_layers": ("depth", "int"),
        "num_single_layers": ("depth_single_blocks", "int"),
        "axes_dims_rope": ("axes_dim", "ints"),
        "rope_theta": ("theta", "int"),
        "mlp_ratio": ("mlp_ratio", "float"),
        "guidance_embeds": ("use_guidance_embed", "bool"),
    }
    FIXED_CONFIG: ClassVar[Mapping[str, Any]] = {
        "patch_size": 1,
        "timestep_guidance_channels": TIMESTEP_DIM,
        "eps": 1e-6,
    }

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

    @classmethod
    def presets(cls) -> Mapping[str, Flux2Params]:
        """The official presets, :data:`FLUX2_PRESETS`."""
        return FLUX2_PRESETS

    @classmethod
    def from_state_dict_shapes(
        cls, shapes: Shapes, *, source: str = "the checkpoint", config: ComponentConfig | None = None
    ) -> Flux2Params:
        """Infer the sizes from BFL-named tensor shapes (no tensor data needed), the config first.

        Every field the component's config carries (the diffusers ``config.json`` beside the weights, or
        ``ModelConfig(config=)``) is taken from it and checked against the shapes; depths come from block indices,
        widths from weight shapes, the head dim from the QK-norm scale size. ``axes_dim`` and ``theta``, which no
        BFL file stores, fall back to :func:`default_axes_dim` and 2000.

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
        probe = ShapeProbe(shapes, "FLUX.2", source)
        hidden, in_channels = probe.need("img_in.weight", 2)
        context_hidden, context_in_dim = probe.need("txt_in.weight", 2)
        depth, depth_single, head_dim, mlp_hidden = cls.read_blocks(probe, hidden, ("img_mlp.2.weight", 1))
        time_in = probe.need("time_in.in_layer.weight", 2)
        if hidden <= 0 or context_hidden != hidden or time_in != (hidden, TIMESTEP_DIM):
            raise probe.fail(f"inconsistent widths: img_in {hidden}, txt_in {context_hidden}, time_in {time_in}")
        if config is not None and config.typed("out_channels", "int", in_channels) != in_channels:
            raise probe.fail(
                f"{config.source} gives out_channels={config.get('out_channels')} but FLUX.2 predicts "
                f"in_channels={in_channels}"
            )
        inferred = {
            "in_channels": in_channels,
            "context_in_dim": context_in_dim,
            "hidden_size": hidden,
            "num_heads": hidden // head_dim,
            "depth": depth,
            "depth_single_blocks": depth_single,
            "mlp_ratio": mlp_hidden / hidden,
            "use_guidance_embed": "guidance_in.in_layer.weight" in probe,
        }
        return cls.settle(probe, inferred, config, {"axes_dim": default_axes_dim}, mlp_hidden)


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
class AutoEncoderParams(LdmAutoEncoderParams):
    """Sizes of the FLUX.2 autoencoder (``Flux2AutoEncoder``).

    Attributes:
        z_channels: Latent channels before patchification (32).
        patch_size: Latent patchification (2 x 2) before the BatchNorm normalisation.
        bn_eps: Epsilon of the latent BatchNorm statistics.

    The other sizes are :class:`~diffstudio.loading.shapes.LdmAutoEncoderParams`'.
    """

    z_channels: int = 32
    patch_size: tuple[int, int] = field(default=(2, 2))
    bn_eps: float = 1e-4

    def __post_init__(self) -> None:
        """Normalise ``patch_size`` and check the sizes (see the base class)."""
        self.patch_size = (int(self.patch_size[0]), int(self.patch_size[1]))
        super().__post_init__()

    @property
    def latent_channels(self) -> int:
        """Channels of a normalised, patchified latent (``z_channels * 2 * 2`` = 128)."""
        return self.z_channels * math.prod(self.patch_size)

    @property
    def downsample_factor(self) -> int:
        """Image pixels per normalised latent pixel along one side (16 for the official AE)."""
        return (1 << (len(self.ch_mult) - 1)) * self.patch_size[0]

    @classmethod
    def from_state_dict_shapes(
        cls, shapes: Shapes, *, source: str = "the checkpoint", config: ComponentConfig | None = None
    ) -> AutoEncoderParams:
        """Infer the sizes from BFL-named autoencoder tensor shapes (``ae.safetensors`` layout), the config first.

        The GroupNorm groups are not stored in the weights: a diffusers ``config.json`` gives them
        (``norm_num_groups``), else the official 32.

        Raises:
            ParamsShapeError: A needed key is missing, has another rank, or the shapes are inconsistent.
        """
        probe = ShapeProbe(shapes, "FLUX.2 AE", source)
        sizes = ldm_autoencoder_sizes(probe)
        (bn_channels,) = probe.need("bn.running_mean", 1)
        z = sizes["z_channels"]
        if bn_channels % z:
            raise probe.fail(f"latent BatchNorm has {bn_channels} channels, not a multiple of z_channels {z}")
        side = math.isqrt(bn_channels // z)
        groups = config.typed("norm_num_groups", "int", 32) if config is not None else 32
        try:
            return cls(**sizes, patch_size=(side, side), norm_groups=groups)
        except ConfigError as exc:
            raise probe.fail(str(exc)) from None
