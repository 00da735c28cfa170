"""Checkpoint detection and loading for the FLUX.1 family (what the ``load_model`` hook returns).

Every claim is decided from tensor names and shapes only (no data read, no hash table):

* DiT, BFL single file (``flux1-dev``, ``flux1-schnell``, ``flux1-kontext-dev``, ``flux1-fill-dev``; also under
  ComfyUI's ``model.diffusion_model.`` / ``diffusion_model.`` prefixes) or diffusers ``transformer/`` folder
  (sharded or not). The variant (``dev``, ``schnell``, ``fill``, ``flex``, ``custom``) comes from widths and the
  guidance embedder; dev and Kontext share every shape, so both are ``dev`` (Kontext is a way of calling it).
  FLUX.1-Krea-dev has dev's tensors too: ``krea-dev`` comes from its name only (:func:`named_variant`).
* VAE, BFL ``ae.safetensors`` or diffusers ``vae/`` (``AutoencoderKL``; its ``config.json`` supplies the
  latent scale and shift when present).
* Text encoders: CLIP-L (``text_encoder/``, legacy ``text_model.*`` or transformers-5 keys) and T5-XXL
  encoders (``text_encoder_2/``, sharded).

Models are built by :func:`~diffstudio.loading.recipe.build_from_checkpoint`: config first (the diffusers
``config.json`` beside the weights, or ``ModelConfig(config=...)``; e.g. the RoPE ``axes_dims_rope`` that no BFL
file stores), then sizes from shapes, on the meta device, the memory-mapped tensors assigned strictly.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffstudio.loading.recipe import COMFY_PREFIXES, common_prefix, first_claim, text_config
from diffstudio.types import LoadRequest, ModelClaim

if TYPE_CHECKING:
    from diffstudio.config import ModelConfig
    from diffstudio.loading import Checkpoint
    from torch import nn

FAMILY = "flux1"
__all__ = [
    "COMFY_PREFIXES",
    "FAMILY",
    "VARIANT_DEFAULTS",
    "claim",
    "load_dit",
    "load_vae",
    "named_variant",
    "strip_prefix",
    "variant_name",
]


def strip_prefix(keys: list[str]) -> str:
    """The ComfyUI-style prefix every key carries ('' when none)."""
    return common_prefix(keys, COMFY_PREFIXES)


def variant_name(hidden: int, in_channels: int, guidance: bool) -> str:
    """Name the official variant with these sizes (``custom`` for any other consistent size).

    196 input channels (64 latent + 132 conditioning) with a guidance embedder is Flex.2 at any width: its
    conditioning channels are built by the ``diffstudio-flex`` plugin.
    """
    if in_channels == 196 and guidance:
        return "flex"
    if hidden != 3072:
        return "custom"
    if in_channels == 384:
        return "fill"
    if in_channels == 64:
        return "dev" if guidance else "schnell"
    return "custom"


def claim_dit(checkpoint: Checkpoint) -> ModelClaim | None:
    """Claim a FLUX.1 DiT in BFL (optionally ComfyUI-prefixed) or diffusers layout."""
    from diffstudio_flux1.convert import DIT_PROBES, detect_flux1_dit_format

    keys = checkpoint.keys()
    prefix = strip_prefix(keys)
    names = {k[len(prefix) :] for k in keys}
    if any(n.startswith(FOREIGN_PREFIXES) for n in names):  # a DiT inside another system's file: its plugin claims it
        return None
    probes = {p for trio in DIT_PROBES.values() for p in trio}
    shapes: dict[str, tuple[int, ...]] = {p: checkpoint.shape(prefix + p) for p in probes if p in names}
    if any("controlnet" in n for n in names):
        shapes["controlnet"] = (1,)
    fmt = detect_flux1_dit_format(shapes)
    if fmt is None:
        return None
    hidden, in_channels = shapes[DIT_PROBES[fmt][0]]
    guidance = any(n.startswith(("guidance_in.", "time_text_embed.guidance_embedder.")) for n in names)
    variant = variant_name(hidden, in_channels, guidance)
    source = ("comfy" if prefix else "bfl") if fmt == "bfl" else "diffusers"
    return ModelClaim(FAMILY, f"flux1-dit/{variant}", "dit", source, load_dit)


def load_dit(checkpoint: Checkpoint, request: LoadRequest) -> nn.Module:
    """Build :class:`~diffstudio_flux1.model.Flux` from a claimed checkpoint (any layout, config first)."""
    from diffstudio.loading.recipe import build_from_checkpoint

    from diffstudio_flux1.convert import convert_diffusers_to_bfl_dit
    from diffstudio_flux1.model import Flux
    from diffstudio_flux1.params import FluxParams

    return build_from_checkpoint(
        checkpoint,
        request,
        infer=FluxParams.from_state_dict_shapes,
        build=Flux,
        convert=convert_diffusers_to_bfl_dit,
        converted_if="x_embedder.weight",
        config_classes=FluxParams.DIFFUSERS_CLASSES,
        prefixes=COMFY_PREFIXES,
    )


def claim_vae(checkpoint: Checkpoint) -> ModelClaim | None:
    """Claim a FLUX.1 autoencoder in BFL or diffusers layout."""
    from diffstudio_flux1.convert import VAE_PROBES, detect_flux1_vae_format

    keys = checkpoint.keys()
    shapes = {k: checkpoint.shape(k) for k in keys if k == "encoder.conv_out.weight" or k in VAE_PROBES.values()}
    marks = ("quant_conv.", "post_quant_conv.", "encoder.quant_conv.", "decoder.post_quant_conv.", "bn.")
    shapes.update({k: (1,) for k in keys if k.startswith(marks)})
    fmt = detect_flux1_vae_format(shapes)
    if fmt is None:
        return None
    return ModelClaim(FAMILY, "flux1-vae", "vae", fmt, load_vae)


def load_vae(checkpoint: Checkpoint, request: LoadRequest) -> nn.Module:
    """Build :class:`~diffstudio_flux1.vae.AutoEncoder` from a claimed checkpoint (either layout).

    The latent scale and shift and the GroupNorm groups come from the diffusers ``config.json`` (beside the
    weights or ``ModelConfig(config=)``) when there is one, else FLUX.1's values.
    """
    from diffstudio.loading.recipe import build_from_checkpoint

    from diffstudio_flux1.convert import convert_diffusers_to_bfl_vae
    from diffstudio_flux1.params import AutoEncoderParams
    from diffstudio_flux1.vae import AutoEncoder

    return build_from_checkpoint(
        checkpoint,
        request,
        infer=AutoEncoderParams.from_state_dict_shapes,
        build=AutoEncoder,
        convert=convert_diffusers_to_bfl_vae,
        converted_if="encoder.down_blocks.0.resnets.0.conv1.weight",
        config_classes=("AutoencoderKL",),
        prefetch=True,
    )


def claim_text_encoder(checkpoint: Checkpoint) -> ModelClaim | None:
    """Claim a CLIP text encoder or a T5 encoder."""
    from diffstudio_flux1.text_encoders import clip_prefix, is_t5_encoder

    keys = checkpoint.keys()
    if clip_prefix(keys) is not None:
        layout = "legacy" if clip_prefix(keys) == "text_model." else "transformers5"
        return ModelClaim(FAMILY, "flux1-text-encoder/clip", "text_encoder", layout, load_clip)
    if is_t5_encoder(keys):
        return ModelClaim(FAMILY, "flux1-text-encoder/t5", "text_encoder_2", "transformers", load_t5)
    return None


def load_clip(checkpoint: Checkpoint, request: LoadRequest) -> Any:
    """Build the CLIP text model (``transformers.CLIPTextModel``)."""
    from diffstudio_flux1.text_encoders import load_clip_encoder

    return load_clip_encoder(checkpoint, request.torch_dtype, request.device, text_config(checkpoint, request))


def load_t5(checkpoint: Checkpoint, request: LoadRequest) -> Any:
    """Build the T5 encoder (``transformers.T5EncoderModel``)."""
    from diffstudio_flux1.text_encoders import load_t5_encoder

    return load_t5_encoder(checkpoint, request.torch_dtype, request.device, text_config(checkpoint, request))


def claim(checkpoint: Checkpoint) -> ModelClaim | None:
    """The family's answer to ``load_model``: the first of DiT, VAE, text encoder that matches."""
    return first_claim(checkpoint, (claim_dit, claim_vae, claim_text_encoder))


# --- variants told apart by name only (FLUX.1-Krea-dev) ---------------------------------------------------------

VARIANT_DEFAULTS: dict[str, dict[str, float]] = {"krea-dev": {"embedded_guidance": 4.5}}
"""Call defaults per DiT variant where they differ from dev's (``embedded_guidance`` 3.5)."""

NAMED_VARIANTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "krea-dev": (("flux1-krea-dev",), ("black-forest-labs/flux.1-krea-dev",)),
}
"""Variants with dev's exact tensors: ``variant -> (file-name prefixes, model ids)``, compared case-insensitively."""

VARIANT_FIELD = "model_variant"
"""``ModelConfig(config={"model_variant": "krea-dev"})`` selects a named variant for a renamed file (or ``"dev"``)."""


def _named_by(files: list[Path], model_id: str) -> str | None:
    """The named variant that a model id, a file name or a repository folder (last 4 levels) says, or None."""
    names = [f.name.lower() for f in files]
    folders = {p.lower() for f in files for p in f.parent.parts[-4:]}
    for variant, (prefixes, ids) in NAMED_VARIANTS.items():
        repos = {i.rsplit("/", 1)[-1] for i in ids} | {"models--" + i.replace("/", "--") for i in ids}
        if model_id in ids or any(n.startswith(prefixes) for n in names) or folders & repos:
            return variant
    return None


def named_variant(found: ModelClaim, checkpoint: Checkpoint, config: ModelConfig | None) -> ModelClaim:
    """Refine a ``flux1-dit/dev`` (or ``custom``-width) claim to a variant that only its name tells apart (Krea).

    Krea's tensors equal dev's name for name and shape, so nothing here looks at keys: the variant comes from
    ``ModelConfig(config={"model_variant": ...})`` when given, else from the model id
    (``black-forest-labs/FLUX.1-Krea-dev``), else from the file names (``flux1-krea-dev*``) or the repository
    folder of a diffusers ``transformer/`` (``FLUX.1-Krea-dev``, or the Hugging Face cache's
    ``models--black-forest-labs--FLUX.1-Krea-dev``).

    Raises:
        ConfigError: ``model_variant`` names no variant with dev's tensors.
    """
    import dataclasses

    from diffstudio.errors import ConfigError

    if found.model_type not in (f"{FAMILY}-dit/dev", f"{FAMILY}-dit/custom"):
        return found
    given = config.config.get(VARIANT_FIELD) if config is not None and isinstance(config.config, dict) else None
    if given is not None:
        allowed = ("dev", *NAMED_VARIANTS)
        if given not in allowed:
            raise ConfigError(
                f"ModelConfig(config={{{VARIANT_FIELD!r}: {given!r}}}) names no FLUX.1 variant with dev's tensors; "
                f"use one of {', '.join(map(repr, allowed))}"
            )
        variant: str | None = None if given == "dev" else str(given)
    else:
        model_id = (config.model_id or "").lower() if config is not None else ""
        variant = _named_by([Path(f) for f in checkpoint.files], model_id)
    if variant is None:
        return found
    return dataclasses.replace(found, model_type=f"{FAMILY}-dit/{variant}")


FOREIGN_PREFIXES: tuple[str, ...] = ("connector.", "pipe.", "adapter.", "embedding_merger.")
"""Top-level prefixes of files that hold a FLUX.1 DiT beside another system's weights (Step1X-Edit's
``connector.*``, Nexus-Gen's decoders): FLUX.1 refuses them so that the owning plugin's claim is the only one."""
