"""Tiny FLUX.2 model repositories on disk (diffusers layout, plus a BFL DiT file) for the pipeline tests.

A repository has ``transformer/`` (a perturbed ``Flux2Transformer2DModel``), ``vae/`` (a perturbed
``AutoencoderKLFlux2``), ``text_encoder/`` and ``tokenizer/`` (Qwen3 for klein, Mistral3 for dev, from
``fixtures_text``), and ``flux2.safetensors``, the DiT converted to BFL names. The text width is
``3 * 32 = 96``, the VAE has 8 latent channels (32 after 2x2 patchify) and a 2x downsampling, so one latent
token covers 4x4 pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from diffstudio.testing import import_file
from safetensors.torch import save_file

TEXT_WIDTH = 96
LATENT_CHANNELS = 32
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "time_shift_type": "exponential",
}


def _load(name: str) -> ModuleType:
    return import_file(Path(__file__).with_name(f"{name}.py"))


fx = _load("fixtures_text")


@dataclass
class Repo:
    """A tiny model repository and the diffusers pipeline built from the same files."""

    root: Path
    kind: str  # "klein" or "dev"
    reference: Any  # the diffusers pipeline

    @property
    def bfl_dit(self) -> Path:
        return self.root / "flux2.safetensors"


def build_transformer(helpers: ModuleType, guidance: bool, seed: int) -> Any:
    from diffusers import Flux2Transformer2DModel

    model = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=LATENT_CHANNELS,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH,
        timestep_guidance_channels=256,
        mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4),
        rope_theta=2000,
        guidance_embeds=guidance,
    )
    helpers.perturb(model, seed)
    return model.eval()


def build_repo(root: Path, kind: str, helpers: ModuleType, seed: int = 0) -> Repo:
    """Write a tiny klein or dev repository under ``root`` and build diffusers' pipeline on it."""
    from diffstudio_flux2.convert import convert_diffusers_to_bfl_dit
    from diffstudio_flux2.text_encoders import load_tokenizer
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline

    transformer = build_transformer(helpers, guidance=kind == "dev", seed=seed + 10)
    transformer.save_pretrained(root / "transformer")
    bfl = convert_diffusers_to_bfl_dit(helpers.read_folder(root / "transformer"))
    save_file({k: v.contiguous() for k, v in bfl.items()}, str(root / "flux2.safetensors"))
    helpers.diffusers_vae(seed=seed + 20).save_pretrained(root / "vae")
    vae = AutoencoderKLFlux2.from_pretrained(str(root / "vae")).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    if kind == "klein":
        vocab = fx.build_qwen3_tokenizer(root / "tokenizer")
        encoder = fx.build_qwen3_encoder(root / "text_encoder", vocab, seed=seed)
        tokenizer = load_tokenizer(root / "tokenizer", "qwen3")
        reference: Any = Flux2KleinPipeline(
            scheduler=scheduler, vae=vae, text_encoder=encoder, tokenizer=tokenizer, transformer=transformer
        )
    else:
        vocab = fx.build_mistral_tokenizer(root / "tokenizer")
        tokenizer = load_tokenizer(root / "tokenizer", "mistral3")
        img = tokenizer.convert_tokens_to_ids("[IMG]")
        encoder = fx.build_mistral3_encoder(root / "text_encoder", vocab, img, seed=seed)
        reference = Flux2Pipeline(
            scheduler=scheduler, vae=vae, text_encoder=encoder, tokenizer=tokenizer, transformer=transformer
        )
    reference.set_progress_bar_config(disable=True)
    return Repo(root, kind, reference)


def noise(batch: int, height: int, width: int, seed: int = 123) -> torch.Tensor:
    """Unpacked initial noise ``(B, 32, H/4, W/4)`` (diffusers' ``latents=`` layout)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, LATENT_CHANNELS, height // 4, width // 4, generator=gen)


def image(width: int, height: int, seed: int) -> Any:
    """A smooth random RGB PIL image."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    small = torch.rand(3, max(height // 8, 1), max(width // 8, 1), generator=gen)
    big = torch.nn.functional.interpolate(small[None], size=(height, width), mode="bilinear")[0]
    array = (big.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    return Image.fromarray(array)
