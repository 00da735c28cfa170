"""Tiny perturbed FLUX.1 models in the official on-disk formats, shared by the flux1 tests.

Every model is small (2 double + 2 single blocks, 2 heads of 32 channels; a 2-level VAE with 16 latent
channels) and its random weights are perturbed (norm gains away from 1, large modulation projections, biases)
so that a swapped or transposed tensor shows up as a large difference. Models are written as a diffusers
folder, a sharded diffusers folder and a BFL single file, and loaded back through ``ModelConfig`` paths
(claims of every installed family, then the claimed loader).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from diffstudio import ModelConfig
from diffstudio.identify import identify
from diffstudio.runtime import Runtime
from diffstudio.types import LoadRequest
from diffstudio_flux1.convert import convert_diffusers_to_bfl_dit, convert_diffusers_to_bfl_vae
from diffstudio_flux1.math import image_ids, text_ids
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

IN_CHANNELS, CONTEXT_DIM, POOLED_DIM, HEADS, HEAD_DIM = 64, 24, 20, 2, 32
AXES = (4, 14, 14)
TOL = 1e-4


@torch.no_grad()
def perturb(model: nn.Module, seed: int) -> None:
    """Overwrite every parameter with seeded random values of a sensible scale."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if "norm" in name and p.ndim == 1 and not name.endswith("bias") and "linear" not in name:
            p.copy_(1.0 + 0.5 * noise)  # norm gains
        elif "norm1" in name or "norm.linear" in name or "norm_out" in name:
            p.copy_(2.0 * noise / (p.shape[-1] if p.ndim > 1 else 64) ** 0.5)  # strong shift / scale / gate
        else:
            fan_in = p[0].numel() if p.ndim > 1 else 16
            p.copy_(noise / fan_in**0.5)


def diffusers_dit(
    guidance: bool, seed: int = 0, in_channels: int = IN_CHANNELS, context: int = CONTEXT_DIM, pooled: int = POOLED_DIM
) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=in_channels,
        out_channels=IN_CHANNELS,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=context,
        pooled_projection_dim=pooled,
        guidance_embeds=guidance,
        axes_dims_rope=AXES,
    )
    perturb(model, seed)
    return model.eval()


def diffusers_vae(seed: int = 0) -> nn.Module:
    from diffusers import AutoencoderKL

    model = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=32,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    perturb(model, seed)
    return model.eval()


def read_folder(folder: Path) -> dict[str, Tensor]:
    """Load every safetensors shard of a diffusers folder (checking the index when sharded)."""
    sd: dict[str, Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(f))
    index = list(folder.glob("*.safetensors.index.json"))
    if index:
        assert set(json.loads(index[0].read_text())["weight_map"]) == set(sd)
    return sd


def load(path: Path, runtime: Runtime | None = None) -> tuple[Any, Any]:
    """Identify ``path`` through every installed family and build the claimed model (fp32, CPU)."""
    config = ModelConfig(path=str(path))
    checkpoint, claim = identify(runtime or Runtime(), config)
    return claim.load(checkpoint, LoadRequest(config, torch.float32, "cpu")), claim


@dataclass
class Case:
    """A diffusers reference model and its files in every official layout."""

    reference: nn.Module
    guidance: bool
    files: dict[str, Path]  # layout -> path

    def load(self, layout: str) -> Any:
        return load(self.files[layout])[0]


def save_dit_case(root: Path, guidance: bool, seed: int, in_channels: int = IN_CHANNELS) -> Case:
    ref = diffusers_dit(guidance, seed=seed, in_channels=in_channels)
    folder, sharded, bfl = root / "transformer", root / "sharded", root / "flux1.safetensors"
    ref.save_pretrained(folder)
    ref.save_pretrained(sharded, max_shard_size="100KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    bfl_sd = convert_diffusers_to_bfl_dit(read_folder(folder))
    save_file({k: v.contiguous() for k, v in bfl_sd.items()}, str(bfl))
    return Case(ref, guidance, {"bfl": bfl, "diffusers": folder, "diffusers-sharded": sharded})


@pytest.fixture(scope="session")
def dit_cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    """``schnell`` (no guidance embedder) and ``dev`` (guidance embedder) style tiny DiTs."""
    return {
        name: save_dit_case(tmp_path_factory.mktemp(f"dit-{name}"), guidance, seed)
        for name, guidance, seed in (("schnell", False, 0), ("dev", True, 1))
    }


@pytest.fixture(scope="session")
def vae_case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    root = tmp_path_factory.mktemp("vae")
    ref = diffusers_vae()
    folder, bfl = root / "vae", root / "ae.safetensors"
    ref.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in convert_diffusers_to_bfl_vae(read_folder(folder)).items()}, str(bfl))
    return Case(ref, False, {"bfl": bfl, "diffusers": folder})


def dit_inputs(batch: int = 2, height: int = 4, width: int = 6, txt: int = 7, seed: int = 0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "img": torch.randn(batch, height * width, IN_CHANNELS, generator=gen),
        "img_ids": image_ids(1, height, width)[0],
        "txt": torch.randn(batch, txt, CONTEXT_DIM, generator=gen),
        "txt_ids": text_ids(1, txt)[0],
        "timesteps": torch.rand(batch, generator=gen),
        "y": torch.randn(batch, POOLED_DIM, generator=gen),
        "guidance": 1.0 + 4.0 * torch.rand(batch, generator=gen),
    }


@torch.no_grad()
def run_reference(ref: nn.Module, inp: dict[str, Any], guidance: bool, **extra: Any) -> Tensor:
    """The diffusers forward on our inputs (diffusers takes times in [0, 1] and scales them itself)."""
    out: Tensor = ref(
        hidden_states=inp["img"],
        encoder_hidden_states=inp["txt"],
        pooled_projections=inp["y"],
        timestep=inp["timesteps"],
        img_ids=inp["img_ids"],
        txt_ids=inp["txt_ids"],
        guidance=inp["guidance"] if guidance else None,
        **extra,
    ).sample
    return out


@pytest.fixture(scope="session")
def helpers() -> ModuleType:
    """This module: test modules cannot import conftest under --import-mode=importlib."""
    return sys.modules[__name__]
