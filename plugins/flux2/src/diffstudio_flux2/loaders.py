"""Checkpoint detection and loading for the FLUX.2 family (what the ``load_model`` hook returns).

Every claim is decided from tensor names and shapes only (no data read, no hash table):

* DiT, BFL single file (``flux2-dev.safetensors``, ``flux-2-klein-*.safetensors``; also under ComfyUI's
  ``model.diffusion_model.`` / ``diffusion_model.`` prefixes) or diffusers ``transformer/`` folder (sharded or
  not). The variant name (``dev``, ``klein-4b``, ``klein-9b``, or ``custom``) comes from the widths.
* VAE, BFL ``ae.safetensors`` or diffusers ``vae/`` (``AutoencoderKLFlux2``, with the BatchNorm statistics).
* Text encoders: Qwen3 (klein) and Mistral3 (dev) ``text_encoder/`` folders.

Models are built on the meta device and the memory-mapped tensors are assigned, strictly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from diffstudio.types import LoadRequest, ModelClaim

if TYPE_CHECKING:
    from diffstudio.loading import Checkpoint
    from torch import nn

FAMILY = "flux2"
COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def _strip_prefix(keys: list[str]) -> str:
    """The ComfyUI-style prefix every key carries ('' when none)."""
    for prefix in COMFY_PREFIXES:
        if keys and all(k.startswith(prefix) for k in keys):
            return prefix
    return ""


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
    context = checkpoint.shape(prefix + context_key)[1] if prefix + context_key in checkpoint else 0
    guidance = any(n.startswith(("guidance_in.", "time_guidance_embed.guidance_embedder.")) for n in names)
    variant = variant_name(hidden, context, guidance)
    source = ("comfy" if prefix else "bfl") if fmt == "bfl" else "diffusers"
    return ModelClaim(FAMILY, f"flux2-dit/{variant}", "dit", source, load_dit)


def load_dit(checkpoint: Checkpoint, request: LoadRequest) -> nn.Module:
    """Build :class:`~diffstudio_flux2.model.Flux2` from a claimed checkpoint (any layout)."""
    from diffstudio.loading import build_on_meta, load_state_dict_into

    from diffstudio_flux2.convert import convert_diffusers_to_bfl_dit
    from diffstudio_flux2.model import Flux2
    from diffstudio_flux2.params import Flux2Params

    keys = checkpoint.keys()
    prefix = _strip_prefix(keys)
    state = {k[len(prefix) :]: checkpoint.tensor(k) for k in keys}
    if "x_embedder.weight" in state:
        state = convert_diffusers_to_bfl_dit(state)
    params = Flux2Params.from_state_dict_shapes({k: tuple(v.shape) for k, v in state.items()})
    model = build_on_meta(lambda: Flux2(params))
    load_state_dict_into(model, state, dtype=request.torch_dtype, device=request.device)
    return model.eval().requires_grad_(False)


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


def load_vae(checkpoint: Checkpoint, request: LoadRequest) -> nn.Module:
    """Build :class:`~diffstudio_flux2.vae.Flux2AutoEncoder` (BatchNorm statistics kept in float32)."""
    import torch
    from diffstudio.loading import build_on_meta, load_state_dict_into

    from diffstudio_flux2.convert import convert_diffusers_to_bfl_vae
    from diffstudio_flux2.params import AutoEncoderParams
    from diffstudio_flux2.vae import Flux2AutoEncoder

    state = {k: checkpoint.tensor(k) for k in checkpoint.keys()}
    if "quant_conv.weight" in state:
        state = convert_diffusers_to_bfl_vae(state)
    params = AutoEncoderParams.from_state_dict_shapes({k: tuple(v.shape) for k, v in state.items()})
    model = build_on_meta(lambda: Flux2AutoEncoder(params))
    load_state_dict_into(model, state, dtype=request.torch_dtype, device=request.device)
    for name in ("running_mean", "running_var"):
        buffer = getattr(model.bn, name)
        setattr(model.bn, name, buffer.to(torch.float32))
    return model.eval().requires_grad_(False)


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
    """Build the Qwen3 decoder (layers up to 27 only) of a klein text encoder."""
    from diffstudio_flux2.text_encoders import load_qwen3_encoder

    return load_qwen3_encoder(checkpoint, request.torch_dtype, request.device)


def load_mistral3(checkpoint: Checkpoint, request: LoadRequest) -> Any:
    """Build the Mistral text decoder (layers up to 30 only) of the dev text encoder."""
    from diffstudio_flux2.text_encoders import load_mistral3_encoder

    return load_mistral3_encoder(checkpoint, request.torch_dtype, request.device)


def claim(checkpoint: Checkpoint) -> ModelClaim | None:
    """The family's answer to ``load_model``: the first of DiT, VAE, text encoder that matches."""
    for probe in (claim_dit, claim_vae, claim_text_encoder):
        found = probe(checkpoint)
        if found is not None:
            return found
    return None
