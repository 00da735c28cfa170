"""A tiny FLUX.1 model repository on disk (official layout) and the diffusers pipelines built on the same files.

The repository has ``transformer/`` (a perturbed ``FluxTransformer2DModel``, dev-style with a guidance
embedder), ``vae/`` (a perturbed FLUX-configured ``AutoencoderKL``, 2 levels: one latent token covers 4 x 4
pixels), ``text_encoder/`` + ``tokenizer/`` (CLIP), ``text_encoder_2/`` + ``tokenizer_2/`` (T5, sharded), and
the BFL single files ``flux1-dev.safetensors`` and ``ae.safetensors`` converted from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from diffstudio.testing import import_file
from safetensors.torch import save_file

SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def _load(name: str) -> ModuleType:
    return import_file(Path(__file__).with_name(f"{name}.py"))


fx = _load("fixtures_text")


@dataclass
class Repo:
    """A tiny FLUX.1 repository and the diffusers components loaded from it."""

    root: Path
    components: dict[str, Any]

    def pipeline(self, kind: str = "FluxPipeline") -> Any:
        import diffusers
        from diffusers import FlowMatchEulerDiscreteScheduler

        cls = getattr(diffusers, kind)
        pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), **self.components)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def build_repo(root: Path, helpers: ModuleType, seed: int = 0) -> Repo:
    from diffstudio_flux1.convert import convert_diffusers_to_bfl_dit, convert_diffusers_to_bfl_vae
    from diffstudio_flux1.text_encoders import load_tokenizer
    from diffusers import AutoencoderKL

    transformer = helpers.diffusers_dit(True, seed=seed + 10, context=fx.T5_HIDDEN, pooled=fx.CLIP_HIDDEN)
    transformer.save_pretrained(root / "transformer")
    bfl = convert_diffusers_to_bfl_dit(helpers.read_folder(root / "transformer"))
    save_file({k: v.contiguous() for k, v in bfl.items()}, str(root / "flux1-dev.safetensors"))
    helpers.diffusers_vae(seed=seed + 20).save_pretrained(root / "vae")
    ae = convert_diffusers_to_bfl_vae(helpers.read_folder(root / "vae"))
    save_file({k: v.contiguous() for k, v in ae.items()}, str(root / "ae.safetensors"))
    clip_vocab = fx.build_clip_tokenizer(root / "tokenizer")
    t5_vocab = fx.build_t5_tokenizer(root / "tokenizer_2")
    clip = fx.build_clip_encoder(root / "text_encoder", clip_vocab, seed=seed)
    t5 = fx.build_t5_encoder(root / "text_encoder_2", t5_vocab, seed=seed + 1)
    components = {
        "vae": AutoencoderKL.from_pretrained(str(root / "vae")).eval(),
        "text_encoder": clip,
        "tokenizer": load_tokenizer(root / "tokenizer", "clip"),
        "text_encoder_2": t5,
        "tokenizer_2": load_tokenizer(root / "tokenizer_2", "t5"),
        "transformer": transformer,
    }
    return Repo(root, components)


def packed_noise(batch: int, height: int, width: int, seed: int = 123) -> torch.Tensor:
    """Noise in the packed token layout ``(B, H/4 * W/4, 64)`` (what both pipelines take as ``latents=``)."""
    from diffstudio_flux1.math import pack_latents

    gen = torch.Generator().manual_seed(seed)
    return pack_latents(torch.randn(batch, 16, height // 2, width // 2, generator=gen))


def image(width: int, height: int, seed: int) -> Any:
    """A smooth random RGB PIL image."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    small = torch.rand(3, max(height // 8, 1), max(width // 8, 1), generator=gen)
    big = torch.nn.functional.interpolate(small[None], size=(height, width), mode="bilinear")[0]
    return Image.fromarray((big.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
