"""State-dict converters between BFL (canonical) and diffusers layouts of FLUX.2, and format probes.

The BFL layout is what ``Flux2`` / ``Flux2AutoEncoder`` load by identity. Differences handled here:

* DiT: renames; BFL's fused ``img_attn.qkv`` / ``txt_attn.qkv`` are split into diffusers' ``to_q/to_k/to_v`` /
  ``add_{q,k,v}_proj`` (and fused back); RMS-norm ``scale`` <-> ``weight``; the final adaptive norm's
  projection is (shift, scale) in BFL and (scale, shift) in diffusers, so its halves are swapped.
* VAE: LDM-style renames (``down.i.block.j`` <-> ``down_blocks.i.resnets.j``, decoder levels in reverse
  order, ``nin_shortcut`` <-> ``conv_shortcut``); the mid-block attention's 1x1 convs ``(C, C, 1, 1)`` <->
  linear weights ``(C, C)``; ``encoder.quant_conv`` / ``decoder.post_quant_conv`` <-> top-level
  ``quant_conv`` / ``post_quant_conv``; ``bn`` statistics unchanged.

Converters are pure: they return a new dict and never modify their input. Unknown keys are an error.
Probes look at key names and shapes only (never hashes) and tell FLUX.2 from FLUX.1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from diffstudio.errors import CheckpointError
from diffstudio.loading.dit_keys import DitKeyMap, fail
from diffstudio.loading.ldm_vae import LDM_VAE_TOP, ldm_vae_bfl_to_diffusers, ldm_vae_diffusers_to_bfl
from torch import Tensor

Format = Literal["bfl", "diffusers"]
StateDict = Mapping[str, Tensor]
Shapes = Mapping[str, Sequence[int]]


class Flux2ConversionError(CheckpointError):
    """A state dict does not have the expected FLUX.2 layout."""


def _fail(what: str, keys: list[str]) -> CheckpointError:
    return fail(Flux2ConversionError, what, keys)


# --- DiT

_DIT_TOP = {  # BFL module -> diffusers module
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
    "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
    "single_stream_modulation.lin": "single_stream_modulation.linear",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
_DIT_DOUBLE = {  # inside double_blocks.N / transformer_blocks.N
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "img_attn.proj": "attn.to_out.0",
    "img_mlp.0": "ff.linear_in",
    "img_mlp.2": "ff.linear_out",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
    "txt_attn.proj": "attn.to_add_out",
    "txt_mlp.0": "ff_context.linear_in",
    "txt_mlp.2": "ff_context.linear_out",
}
_DIT_DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_DIT_SINGLE = {  # inside single_blocks.N / single_transformer_blocks.N
    "linear1": "attn.to_qkv_mlp_proj",
    "linear2": "attn.to_out",
    "norm.query_norm": "attn.norm_q",
    "norm.key_norm": "attn.norm_k",
}
_SWAPPED = "final_layer.adaLN_modulation.1"  # (shift, scale) in BFL, (scale, shift) in diffusers
_DIT_KEYS = DitKeyMap(
    "FLUX.2", "Flux2Transformer2DModel", Flux2ConversionError, _DIT_TOP, _DIT_DOUBLE, _DIT_SINGLE, _DIT_DOUBLE_FUSED
)


def convert_bfl_to_diffusers_dit(sd: StateDict) -> dict[str, Tensor]:
    """BFL FLUX.2 DiT keys -> ``Flux2Transformer2DModel`` keys.

    Raises:
        Flux2ConversionError: A key is not part of the BFL FLUX.2 layout.
    """
    return _DIT_KEYS.to_diffusers(sd)


def convert_diffusers_to_bfl_dit(sd: StateDict) -> dict[str, Tensor]:
    """``Flux2Transformer2DModel`` keys -> BFL FLUX.2 DiT keys (the layout ``Flux2`` loads by identity).

    Raises:
        Flux2ConversionError: A key is unknown, or a fused q/k/v triple is incomplete.
    """
    return _DIT_KEYS.to_bfl(sd)


# --- VAE (the LDM renames are core's; FLUX.2 adds the quant convs and the BatchNorm statistics)

_VAE_TOP = {
    **LDM_VAE_TOP,
    "encoder.quant_conv": "quant_conv",
    "decoder.post_quant_conv": "post_quant_conv",
    "bn": "bn",
}


def convert_bfl_to_diffusers_vae(sd: StateDict) -> dict[str, Tensor]:
    """BFL FLUX.2 ``ae.safetensors`` keys -> ``AutoencoderKLFlux2`` keys.

    Raises:
        Flux2ConversionError: A key is not part of the BFL FLUX.2 autoencoder layout.
    """
    return ldm_vae_bfl_to_diffusers(sd, top=_VAE_TOP, what="BFL FLUX.2 autoencoder", fail=_fail)


def convert_diffusers_to_bfl_vae(sd: StateDict) -> dict[str, Tensor]:
    """``AutoencoderKLFlux2`` keys -> BFL FLUX.2 autoencoder keys (the layout ``Flux2AutoEncoder`` loads).

    Raises:
        Flux2ConversionError: A key is not part of the diffusers AutoencoderKLFlux2 layout.
    """
    return ldm_vae_diffusers_to_bfl(sd, top=_VAE_TOP, what="diffusers AutoencoderKLFlux2", fail=_fail)


# --- probes


def _shape(shapes: Shapes, key: str) -> tuple[int, ...] | None:
    return tuple(int(s) for s in shapes[key]) if key in shapes else None


def detect_flux2_dit_format(shapes: Shapes) -> Format | None:
    """Tell whether tensors (name -> shape) are a FLUX.2 DiT, and in which layout.

    FLUX.2 has shared ``double_stream_modulation_*`` projections of width ``6 D`` and no biases; FLUX.1 has
    per-block ``img_mod`` / ``norm1`` modulations and biases, so it is never claimed here.

    Returns:
        ``"bfl"``, ``"diffusers"`` or None (not a FLUX.2 DiT, or keys under an unknown prefix).
    """
    layouts: dict[Format, tuple[str, str, str]] = {
        "bfl": (
            "img_in.weight",
            "double_stream_modulation_img.lin.weight",
            "single_stream_modulation.lin.weight",
        ),
        "diffusers": (
            "x_embedder.weight",
            "double_stream_modulation_img.linear.weight",
            "single_stream_modulation.linear.weight",
        ),
    }
    for fmt, (embed_key, double_key, single_key) in layouts.items():
        embed, double, single = (
            _shape(shapes, embed_key),
            _shape(shapes, double_key),
            _shape(shapes, single_key),
        )
        if embed is None or double is None or single is None or len(embed) != 2:
            continue
        hidden = embed[0]
        if double != (6 * hidden, hidden) or single != (3 * hidden, hidden):
            continue
        if any(k.endswith(".bias") for k in shapes):
            continue
        return fmt
    return None


def detect_flux2_vae_format(shapes: Shapes) -> Format | None:
    """Tell whether tensors (name -> shape) are a FLUX.2 autoencoder, and in which layout.

    FLUX.2's AE has 1x1 quant convs and a ``bn`` holding statistics of 2x2-patchified latents
    (``4 * z_channels`` entries); FLUX.1's AE has neither.

    Returns:
        ``"bfl"``, ``"diffusers"`` or None.
    """
    layouts: dict[Format, tuple[str, str]] = {
        "bfl": ("encoder.quant_conv.weight", "encoder.down.0.block.0.conv1.weight"),
        "diffusers": ("quant_conv.weight", "encoder.down_blocks.0.resnets.0.conv1.weight"),
    }
    bn = _shape(shapes, "bn.running_mean")
    moments = _shape(shapes, "encoder.conv_out.weight")
    if bn is None or moments is None or len(bn) != 1 or len(moments) != 4:
        return None
    for fmt, (quant_key, probe_key) in layouts.items():
        quant = _shape(shapes, quant_key)
        if quant is None or probe_key not in shapes or quant[:2] != (moments[0], moments[0]):
            continue
        if bn[0] == 2 * moments[0]:  # 4 * z_channels, moments hold 2 * z_channels
            return fmt
    return None
