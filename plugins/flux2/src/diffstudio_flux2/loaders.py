"""Checkpoint detection and loading for the FLUX.2 family (what the ``load_model`` hook returns).

Every claim is decided from tensor names and shapes only (no data read, no hash table):

* DiT, BFL single file (``flux2-dev.safetensors``, ``flux-2-klein-*.safetensors``; also under ComfyUI's
  ``model.diffusion_model.`` / ``diffusion_model.`` prefixes) or diffusers ``transformer/`` folder (sharded or
  not). The variant name (``dev``, ``klein-4b``, ``klein-9b``, or ``custom``) comes from the widths.
* VAE, BFL ``ae.safetensors`` or diffusers ``vae/`` (``AutoencoderKLFlux2``, with the BatchNorm statistics).
* Text encoders: Qwen3 (klein) and Mistral3 (dev) ``text_encoder/`` folders.

Models are built by :func:`~diffstudio.loading.recipe.build_from_checkpoint`: config first (the diffusers
``config.json`` beside the weights, or ``ModelConfig(config=...)``; e.g. the RoPE ``axes_dims_rope`` and
``rope_theta`` that no BFL file stores), then sizes from shapes, on the meta device, the memory-mapped tensors
assigned strictly.

Checkpoints of the neighbouring FLUX.1 family are never claimed, but :func:`recognise_foreign` names them (from
their key patterns), so that ``Flux2ImagePipeline`` can say what a file is when no installed family claims it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from diffstudio.errors import CheckpointError, UnknownCheckpointError
from diffstudio.loading.recipe import COMFY_PREFIXES, common_prefix, first_claim, text_config
from diffstudio.types import LoadRequest, ModelClaim

if TYPE_CHECKING:
    from diffstudio.loading import Checkpoint
    from torch import nn

FAMILY = "flux2"
__all__ = ["COMFY_PREFIXES", "FAMILY", "NotFlux2CheckpointError", "claim", "load_dit", "load_vae", "recognise_foreign"]


def _strip_prefix(keys: list[str]) -> str:
    """The ComfyUI-style prefix every key carries ('' when none)."""
    return common_prefix(keys, COMFY_PREFIXES)


def _probe_shapes(checkpoint: Checkpoint, prefix: str, suffixes: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for key in checkpoint.keys():
        name = key[len(prefix) :]
        if name.endswith(suffixes) or name.startswith(("bn.", "encoder.conv_out", "quant_conv", "encoder.quant")):
            shapes[name] = checkpoint.shape(key)
    return shapes


def variant_name(hidden: int, context: int, guidance: bool) -> str:
    """Name the official variant with these widths (``custom`` for any other consistent size)."""
    if guidance and hidden == 6144 and context == 15360:
        return "dev"
    if not guidance and hidden == 3072 and context == 7680:
        return "klein-4b"
    if not guidance and hidden == 4096 and context == 12288:
        return "klein-9b"
    return "custom"


def claim_dit(checkpoint: Checkpoint) -> ModelClaim | None:
    """Claim a FLUX.2 DiT in BFL (optionally ComfyUI-prefixed) or diffusers layout."""
    from diffstudio_flux2.convert import detect_flux2_dit_format

    keys = checkpoint.keys()
    prefix = _strip_prefix(keys)
    names = {k[len(prefix) :] for k in keys}
    probes = (
        "img_in.weight",
        "x_embedder.weight",
        "double_stream_modulation_img.lin.weight",
        "double_stream_modulation_img.linear.weight",
        "single_stream_modulation.lin.weight",
        "single_stream_modulation.linear.weight",
    )
    shapes = {p: checkpoint.shape(prefix + p) for p in probes if p in names}
    if any(k.endswith(".bias") for k in names):
        shapes["any.bias"] = (1,)
    fmt = detect_flux2_dit_format(shapes)
    if fmt is None:
        return None
    embed = "img_in.weight" if fmt == "bfl" else "x_embedder.weight"
    hidden = checkpoint.shape(prefix + embed)[0]
    context_key = "txt_in.weight" if fmt == "bfl" else "context_embedder.weight"
    context_shape = checkpoint.shape(prefix + context_key) if prefix + context_key in checkpoint else ()
    context = context_shape[1] if len(context_shape) == 2 else 0
    guidance = any(n.startswith(("guidance_in.", "time_guidance_embed.guidance_embedder.")) for n in names)
    variant = variant_name(hidden, context, guidance)
    source = ("comfy" if prefix else "bfl") if fmt == "bfl" else "diffusers"
    return ModelClaim(FAMILY, f"flux2-dit/{variant}", "dit", source, load_dit)


def load_dit(checkpoint: Checkpoint, request: LoadRequest) -> nn.Module:
    """Build :class:`~diffstudio_flux2.model.Flux2` from a claimed checkpoint (any layout, config first)."""
    from diffstudio.loading.recipe import build_from_checkpoint

    from diffstudio_flux2.convert import convert_diffusers_to_bfl_dit
    from diffstudio_flux2.model import Flux2
    from diffstudio_flux2.params import Flux2Params

    return build_from_checkpoint(
        checkpoint,
        request,
        infer=Flux2Params.from_state_dict_shapes,
        build=Flux2,
        convert=convert_diffusers_to_bfl_dit,
        converted_if="x_embedder.weight",
        config_classes=Flux2Params.DIFFUSERS_CLASSES,
        prefixes=COMFY_PREFIXES,
    )


def claim_vae(checkpoint: Checkpoint) -> ModelClaim | None:
    """Claim a FLUX.2 autoencoder in BFL or diffusers layout."""
    from diffstudio_flux2.convert import detect_flux2_vae_format

    keys = checkpoint.keys()
    probes = (
        "bn.running_mean",
        "encoder.conv_out.weight",
        "encoder.quant_conv.weight",
        "quant_conv.weight",
        "encoder.down.0.block.0.conv1.weight",
        "encoder.down_blocks.0.resnets.0.conv1.weight",
    )
    shapes = {p: checkpoint.shape(p) for p in probes if p in keys}
    fmt = detect_flux2_vae_format(shapes)
    if fmt is None:
        return None
    return ModelClaim(FAMILY, "flux2-vae", "vae", fmt, load_vae)


_VAE_CLASSES = ("AutoencoderKLFlux2",)


def load_vae(checkpoint: Checkpoint, request: LoadRequest) -> nn.Module:
    """Build :class:`~diffstudio_flux2.vae.Flux2AutoEncoder` (BatchNorm statistics kept in float32).

    The GroupNorm groups come from the diffusers ``config.json`` (``ModelConfig(config=)`` or beside the
    weights), else the safetensors metadata key ``norm_groups`` (BFL-layout files of smaller autoencoders, such
    as the embedded shapes model, record it there), else the official 32.
    """
    import torch
    from diffstudio.loading.component_config import ComponentConfig
    from diffstudio.loading.recipe import build_from_checkpoint
    from diffstudio.loading.shapes import Shapes

    from diffstudio_flux2.convert import convert_diffusers_to_bfl_vae
    from diffstudio_flux2.params import AutoEncoderParams
    from diffstudio_flux2.vae import Flux2AutoEncoder

    def infer(shapes: Shapes, *, source: str, config: ComponentConfig | None) -> AutoEncoderParams:
        stored = checkpoint.metadata.get("norm_groups")
        if stored is not None and (config is None or "norm_num_groups" not in config):
            config = ComponentConfig({"norm_num_groups": int(stored)}, "the norm_groups metadata")
        return AutoEncoderParams.from_state_dict_shapes(shapes, source=source, config=config)

    model = build_from_checkpoint(
        checkpoint,
        request,
        infer=infer,
        build=Flux2AutoEncoder,
        convert=convert_diffusers_to_bfl_vae,
        converted_if="quant_conv.weight",
        config_classes=_VAE_CLASSES,
        prefetch=True,
    )
    for name in ("running_mean", "running_var"):
        buffer = getattr(model.bn, name)
        setattr(model.bn, name, buffer.to(torch.float32))
    return model


def claim_text_encoder(checkpoint: Checkpoint) -> ModelClaim | None:
    """Claim a Qwen3 (klein) or Mistral3 (dev) text encoder."""
    from diffstudio_flux2.text_encoders import is_mistral3_text_encoder, is_qwen3_text_encoder, mistral3_layout

    keys = checkpoint.keys()
    shapes = {
        k: checkpoint.shape(k)
        for k in keys
        if k.endswith(("embed_tokens.weight", "q_norm.weight", "layers.0.self_attn.q_proj.weight"))
    }
    if is_qwen3_text_encoder(keys, shapes):
        return ModelClaim(FAMILY, "flux2-text-encoder/qwen3", "text_encoder", "transformers", load_qwen3)
    if is_mistral3_text_encoder(keys, shapes):
        layout = mistral3_layout(keys, shapes) or "transformers"
        return ModelClaim(FAMILY, "flux2-text-encoder/mistral3", "text_encoder", layout, load_mistral3)
    return None


def load_qwen3(checkpoint: Checkpoint, request: LoadRequest) -> Any:
    """Build the Qwen3 decoder (layers up to 27 only) of a klein text encoder (config first)."""
    from diffstudio_flux2.text_encoders import load_qwen3_encoder

    return load_qwen3_encoder(checkpoint, request.torch_dtype, request.device, config=text_config(checkpoint, request))


def load_mistral3(checkpoint: Checkpoint, request: LoadRequest) -> Any:
    """Build the Mistral text decoder (layers up to 30 only) of the dev text encoder (config first)."""
    from diffstudio_flux2.text_encoders import load_mistral3_encoder

    return load_mistral3_encoder(
        checkpoint, request.torch_dtype, request.device, config=text_config(checkpoint, request)
    )


def claim(checkpoint: Checkpoint) -> ModelClaim | None:
    """The family's answer to ``load_model``: the first of DiT, VAE, text encoder that matches."""
    return first_claim(checkpoint, (claim_dit, claim_vae, claim_text_encoder))


class NotFlux2CheckpointError(UnknownCheckpointError):
    """A checkpoint no installed family claims is recognisably another model (FLUX.1), not FLUX.2.

    Attributes:
        source, telling_keys, families_asked: As in :class:`~diffstudio.errors.UnknownCheckpointError`.
        detected: What the file is, e.g. ``"a FLUX.1-dev DiT (BFL single-file layout)"``.
        evidence: The key names that tell.
    """

    def __init__(self, unknown: UnknownCheckpointError, detected: str, evidence: Sequence[str]) -> None:
        asked = ", ".join(unknown.families_asked) or "none"
        CheckpointError.__init__(
            self,
            f"{unknown.source} is {detected}, not a FLUX.2 model (it has {', '.join(evidence)}). "
            f"Flux2ImagePipeline runs FLUX.2 dev / klein checkpoints, and no installed family claims this file "
            f"(families asked: {asked}). Load it with the FLUX.1 pipeline (pip install diffstudio-flux1), or pass "
            "a FLUX.2 file: flux2-dev.safetensors, flux-2-klein-*.safetensors, a FLUX.2 transformer/ or vae/ "
            "folder, or the FLUX.2 ae.safetensors.",
        )
        self.source = unknown.source
        self.telling_keys = list(unknown.telling_keys)
        self.families_asked = list(unknown.families_asked)
        self.detected = detected
        self.evidence = list(evidence)


_FLUX1_BFL_MODULATION = re.compile(r"^double_blocks\.\d+\.img_mod\.lin\.weight$")
_FLUX1_DIFFUSERS_MODULATION = re.compile(r"^transformer_blocks\.\d+\.norm1\.linear\.weight$")


def recognise_foreign(checkpoint: Checkpoint) -> tuple[str, list[str]] | None:
    """Name a FLUX.1 DiT or autoencoder from key patterns: ``(what it is, keys that tell)``, or None.

    FLUX.1 DiTs have a modulation Linear per block (BFL ``double_blocks.N.img_mod.lin``, diffusers
    ``transformer_blocks.N.norm1.linear``) and a pooled-text input (``vector_in``, ``time_text_embed.text_embedder``)
    where FLUX.2 shares three modulations; FLUX.1's autoencoder has 16 latent channels and no latent BatchNorm.
    """
    keys = checkpoint.keys()
    prefix = _strip_prefix(keys)
    names = [k[len(prefix) :] for k in keys]
    bfl = [n for n in names if _FLUX1_BFL_MODULATION.match(n)] + [n for n in names if n.startswith("vector_in.")]
    if bfl:
        variant = "FLUX.1-dev" if any(n.startswith("guidance_in.") for n in names) else "FLUX.1-schnell"
        layout = "ComfyUI layout" if prefix else "BFL single-file layout"
        return f"a {variant}-style DiT ({layout})", [prefix + n for n in sorted(bfl)[:2]]
    diffusers = [n for n in names if _FLUX1_DIFFUSERS_MODULATION.match(n)]
    diffusers += [n for n in names if n.startswith("time_text_embed.text_embedder.")]
    if diffusers:
        return "a FLUX.1 DiT (diffusers FluxTransformer2DModel layout)", sorted(diffusers)[:2]
    conv_out = next((k for k in keys if k.endswith("encoder.conv_out.weight") and "decoder" not in k), None)
    if conv_out is not None and not any(n.startswith("bn.") for n in names):
        conv_shape = checkpoint.shape(conv_out)
        if len(conv_shape) == 4 and conv_shape[0] // 2 == 16:
            return "a 16-channel autoencoder without FLUX.2's latent BatchNorm (FLUX.1's ae)", [conv_out]
    return None
