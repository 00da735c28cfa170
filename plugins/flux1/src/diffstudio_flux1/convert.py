"""State-dict converters between BFL (canonical) and diffusers layouts of FLUX.1, and format probes.

The BFL layout is what ``Flux`` / ``AutoEncoder`` load by identity. Differences handled here:

* DiT: renames; BFL's fused ``img_attn.qkv`` / ``txt_attn.qkv`` are split into diffusers' ``to_q/to_k/to_v`` /
  ``add_{q,k,v}_proj`` and single blocks' ``linear1`` into ``to_q/to_k/to_v/proj_mlp`` (weights and biases),
  and fused back; RMS-norm ``scale`` <-> ``weight``; the final adaptive norm's projection is (shift, scale) in
  BFL and (scale, shift) in diffusers, so its halves are swapped.
* VAE: LDM-style renames (``down.i.block.j`` <-> ``down_blocks.i.resnets.j``, decoder levels in reverse
  order, ``nin_shortcut`` <-> ``conv_shortcut``, ``norm_out`` <-> ``conv_norm_out``); the mid-block attention's
  1x1 convs ``(C, C, 1, 1)`` <-> linear weights ``(C, C)``. FLUX.1's AE has no quant convs.

Converters are pure: they return a new dict and never modify their input. Unknown keys are an error.
Probes look at key names and shapes only (never hashes) and tell FLUX.1 from FLUX.2.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from diffstudio.errors import CheckpointError
from diffstudio.loading.convert import swap_halves as swap_halves  # the LoRA layouts import it from here
from diffstudio.loading.dit_keys import DitKeyMap, fail
from diffstudio.loading.ldm_vae import LDM_VAE_TOP, ldm_vae_bfl_to_diffusers, ldm_vae_diffusers_to_bfl
from torch import Tensor

Format = Literal["bfl", "diffusers"]
StateDict = Mapping[str, Tensor]
Shapes = Mapping[str, Sequence[int]]


class Flux1ConversionError(CheckpointError):
    """A state dict does not have the expected FLUX.1 layout."""


def _fail(what: str, keys: list[str]) -> CheckpointError:
    return fail(Flux1ConversionError, what, keys)


# --- DiT

DIT_TOP = {  # BFL module -> diffusers module
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
DIT_DOUBLE = {  # inside double_blocks.N / transformer_blocks.N
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "img_attn.proj": "attn.to_out.0",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
    "txt_attn.proj": "attn.to_add_out",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
DIT_DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
DIT_SINGLE = {  # inside single_blocks.N / single_transformer_blocks.N
    "linear2": "proj_out",
    "norm.query_norm": "attn.norm_q",
    "norm.key_norm": "attn.norm_k",
    "modulation.lin": "norm.linear",
}
DIT_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
DIT_KEYS = DitKeyMap(
    "FLUX.1",
    "FluxTransformer2DModel",
    Flux1ConversionError,
    DIT_TOP,
    DIT_DOUBLE,
    DIT_SINGLE,
    DIT_DOUBLE_FUSED,
    DIT_SINGLE_FUSED,
)
"""The FLUX.1 DiT's BFL <-> diffusers names (core's converter scaffolding)."""


def fused_split_sizes(inner: str, rows: int, hidden: int) -> list[int]:
    """Row sizes of the parts of a fused BFL projection with ``rows`` output rows (q, k, v[, mlp])."""
    return DIT_KEYS.split_sizes(4 if inner == "linear1" else 3, rows, hidden)


def bfl_to_diffusers_modules(module: str, rows: Tensor, hidden: int) -> list[tuple[str, Tensor]] | None:
    """A BFL DiT module and a tensor along its output rows -> ``[(diffusers module, its rows)]``.

    Fused projections (q/k/v; ``linear1`` also the MLP) are split into diffusers' parts, the final norm's
    (shift, scale) rows are swapped to (scale, shift). Serves weights, biases and LoRA ``up`` matrices alike.
    Returns None for a module that is not part of the BFL FLUX.1 DiT.
    """
    return DIT_KEYS.bfl_to_diffusers_modules(module, rows, hidden)


def convert_bfl_to_diffusers_dit(sd: StateDict) -> dict[str, Tensor]:
    """BFL FLUX.1 DiT keys -> ``FluxTransformer2DModel`` keys.

    Raises:
        Flux1ConversionError: A key is not part of the BFL FLUX.1 layout.
    """
    return DIT_KEYS.to_diffusers(sd)


def convert_diffusers_to_bfl_dit(sd: StateDict) -> dict[str, Tensor]:
    """``FluxTransformer2DModel`` keys -> BFL FLUX.1 DiT keys (the layout ``Flux`` loads by identity).

    Raises:
        Flux1ConversionError: A key is unknown, or a fused q/k/v(/mlp) group is incomplete.
    """
    return DIT_KEYS.to_bfl(sd)


# --- VAE (the LDM renames are core's; FLUX.1's AE has only the common top-level modules, no quant convs)


def convert_bfl_to_diffusers_vae(sd: StateDict) -> dict[str, Tensor]:
    """BFL FLUX.1 ``ae.safetensors`` keys -> ``AutoencoderKL`` keys (FLUX configuration, no quant convs).

    Raises:
        Flux1ConversionError: A key is not part of the BFL FLUX.1 autoencoder layout.
    """
    return ldm_vae_bfl_to_diffusers(sd, top=LDM_VAE_TOP, what="BFL FLUX.1 autoencoder", fail=_fail)


def convert_diffusers_to_bfl_vae(sd: StateDict) -> dict[str, Tensor]:
    """``AutoencoderKL`` (FLUX configuration) keys -> BFL FLUX.1 autoencoder keys.

    Raises:
        Flux1ConversionError: A key is not part of the diffusers FLUX.1 AutoencoderKL layout (e.g. quant convs).
    """
    return ldm_vae_diffusers_to_bfl(sd, top=LDM_VAE_TOP, what="diffusers FLUX.1 AutoencoderKL", fail=_fail)


# --- probes


def _shape(shapes: Shapes, key: str) -> tuple[int, ...] | None:
    return tuple(int(s) for s in shapes[key]) if key in shapes else None


DIT_PROBES: dict[Format, tuple[str, str, str]] = {
    # embedding, per-block double modulation (6 D x D), pooled-vector embedder
    "bfl": ("img_in.weight", "double_blocks.0.img_mod.lin.weight", "vector_in.in_layer.weight"),
    "diffusers": (
        "x_embedder.weight",
        "transformer_blocks.0.norm1.linear.weight",
        "time_text_embed.text_embedder.linear_1.weight",
    ),
}


def detect_flux1_dit_format(shapes: Shapes) -> Format | None:
    """Tell whether tensors (name -> shape) are a FLUX.1 DiT, and in which layout.

    FLUX.1 has a per-block modulation of width ``6 D`` in every double block (``img_mod`` / ``norm1``) and a
    pooled-text embedder; FLUX.2 has shared ``double_stream_modulation_*`` projections and no pooled vector,
    so it is never claimed here. ControlNets (``controlnet_*`` keys) are adapters, not DiTs.

    Returns:
        ``"bfl"``, ``"diffusers"`` or None (not a FLUX.1 DiT, or keys under an unknown prefix).
    """
    if any("controlnet" in k for k in shapes):
        return None
    for fmt, (embed_key, mod_key, vector_key) in DIT_PROBES.items():
        embed, mod, vector = _shape(shapes, embed_key), _shape(shapes, mod_key), _shape(shapes, vector_key)
        if embed is None or mod is None or vector is None or len(embed) != 2 or len(vector) != 2:
            continue
        hidden = embed[0]
        if mod == (6 * hidden, hidden) and vector[0] == hidden:
            return fmt
    return None


VAE_PROBES: dict[Format, str] = {
    "bfl": "encoder.down.0.block.0.conv1.weight",
    "diffusers": "encoder.down_blocks.0.resnets.0.conv1.weight",
}
_QUANT_OR_BN = ("quant_conv.", "post_quant_conv.", "encoder.quant_conv.", "decoder.post_quant_conv.", "bn.")


def detect_flux1_vae_format(shapes: Shapes) -> Format | None:
    """Tell whether tensors (name -> shape) are a FLUX.1 autoencoder, and in which layout.

    FLUX.1's AE is an LDM autoencoder with 16 latent channels (``encoder.conv_out`` has ``2 * 16`` outputs)
    and no quant convs; FLUX.2's has quant convs and a latent BatchNorm, SD/SDXL VAEs have quant convs and 4
    latent channels.

    Returns:
        ``"bfl"``, ``"diffusers"`` or None.
    """
    if any(k.startswith(_QUANT_OR_BN) for k in shapes):
        return None
    moments = _shape(shapes, "encoder.conv_out.weight")
    if moments is None or len(moments) != 4 or moments[0] != 32:
        return None
    for fmt, probe in VAE_PROBES.items():
        if probe in shapes:
            return fmt
    return None
