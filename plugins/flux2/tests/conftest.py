"""Tiny perturbed FLUX.2 models in the official on-disk formats, shared by the flux2 tests.

Every model is small (2 double + 2 single blocks, 2 heads of 16 channels; a 2-level VAE) and its random
weights are perturbed (norm gains away from 1, large modulation projections, non-trivial BatchNorm
statistics) so that a swapped or transposed tensor shows up as a large difference.
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
from diffstudio_flux2.convert import convert_diffusers_to_bfl_dit, convert_diffusers_to_bfl_vae
from diffstudio_flux2.math import image_ids, text_ids
from diffstudio_flux2.model import Flux2
from diffstudio_flux2.params import AutoEncoderParams, Flux2Params
from diffstudio_flux2.vae import Flux2AutoEncoder
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

IN_CHANNELS, CONTEXT_DIM, HEADS, HEAD_DIM = 16, 24, 2, 16
TOL = 1e-4


def tiny_params(guidance: bool) -> Flux2Params:
    return Flux2Params(
        in_channels=IN_CHANNELS,
        context_in_dim=CONTEXT_DIM,
        hidden_size=HEADS * HEAD_DIM,
        num_heads=HEADS,
        depth=2,
        depth_single_blocks=2,
        axes_dim=(4, 4, 4, 4),
        mlp_ratio=3.0,
        use_guidance_embed=guidance,
    )


@torch.no_grad()
def perturb(model: nn.Module, seed: int) -> None:
    """Overwrite every parameter with seeded random values of a sensible scale."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if "norm" in name and p.ndim == 1 and not name.endswith("bias"):
            p.copy_(1.0 + 0.5 * noise)  # norm gains
        elif "modulation" in name or "norm_out" in name:
            p.copy_(2.0 * noise / p.shape[-1] ** 0.5)  # strong shift / scale / gate
        else:
            fan_in = p[0].numel() if p.ndim > 1 else p.shape[0]
            p.copy_(noise / fan_in**0.5)
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf.copy_(0.5 * torch.randn(buf.shape, generator=gen))
        elif name.endswith("running_var"):
            buf.copy_(0.5 + torch.rand(buf.shape, generator=gen))


def diffusers_dit(guidance: bool, seed: int = 0) -> nn.Module:
    from diffusers import Flux2Transformer2DModel

    model = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=IN_CHANNELS,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=CONTEXT_DIM,
        timestep_guidance_channels=256,
        mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4),
        rope_theta=2000,
        guidance_embeds=guidance,
    )
    perturb(model, seed)
    return model.eval()


def diffusers_vae(seed: int = 0) -> nn.Module:
    from diffusers import AutoencoderKLFlux2

    model = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=8,
        norm_num_groups=32,
        sample_size=32,
    )
    perturb(model, seed)
    model.bn.num_batches_tracked.fill_(7)
    return model.eval()


def read_folder(folder: Path) -> dict[str, Tensor]:
    """Load every safetensors shard of a diffusers folder (checking the index when sharded)."""
    files = sorted(folder.glob("*.safetensors"))
    sd: dict[str, Tensor] = {}
    for f in files:
        sd.update(load_file(f))
    index = list(folder.glob("*.safetensors.index.json"))
    if index:
        weight_map = json.loads(index[0].read_text())["weight_map"]
        assert set(weight_map) == set(sd)
    return sd


def build_dit(sd: dict[str, Tensor]) -> Flux2:
    """Build on the meta device from BFL-named tensors and assign them, strictly."""
    params = Flux2Params.from_state_dict_shapes({k: tuple(v.shape) for k, v in sd.items()})
    params.axes_dim = (4, 4, 4, 4)
    with torch.device("meta"):
        model = Flux2(params)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def build_vae(sd: dict[str, Tensor]) -> Flux2AutoEncoder:
    params = AutoEncoderParams.from_state_dict_shapes({k: tuple(v.shape) for k, v in sd.items()})
    with torch.device("meta"):
        model = Flux2AutoEncoder(params)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


@dataclass
class DitCase:
    """A diffusers reference DiT and its files in every official layout."""

    reference: nn.Module
    guidance: bool
    files: dict[str, Path]  # layout -> path

    def load(self, layout: str) -> Flux2:
        path = self.files[layout]
        if layout == "bfl":
            return build_dit(load_file(path))
        return build_dit(convert_diffusers_to_bfl_dit(read_folder(path)))


def _save_dit_case(root: Path, guidance: bool) -> DitCase:
    ref = diffusers_dit(guidance, seed=1 if guidance else 0)
    folder, sharded, bfl = root / "diffusers", root / "sharded", root / "flux2.safetensors"
    ref.save_pretrained(folder)
    ref.save_pretrained(sharded, max_shard_size="40KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    bfl_sd = convert_diffusers_to_bfl_dit(read_folder(folder))
    save_file({k: v.contiguous() for k, v in bfl_sd.items()}, str(bfl))
    return DitCase(ref, guidance, {"bfl": bfl, "diffusers": folder, "diffusers-sharded": sharded})


@pytest.fixture(scope="session")
def dit_cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DitCase]:
    """``klein`` (no guidance embedder) and ``dev`` (guidance embedder) style tiny DiTs."""
    return {
        name: _save_dit_case(tmp_path_factory.mktemp(f"dit-{name}"), guidance)
        for name, guidance in (("klein", False), ("dev", True))
    }


@dataclass
class VaeCase:
    reference: nn.Module
    files: dict[str, Path]

    def load(self, layout: str) -> Flux2AutoEncoder:
        path = self.files[layout]
        if layout == "bfl":
            return build_vae(load_file(path))
        return build_vae(convert_diffusers_to_bfl_vae(read_folder(path)))


@pytest.fixture(scope="session")
def vae_case(tmp_path_factory: pytest.TempPathFactory) -> VaeCase:
    root = tmp_path_factory.mktemp("vae")
    ref = diffusers_vae()
    folder, sharded, bfl = root / "diffusers", root / "sharded", root / "ae.safetensors"
    ref.save_pretrained(folder)
    ref.save_pretrained(sharded, max_shard_size="100KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    bfl_sd = convert_diffusers_to_bfl_vae(read_folder(folder))
    save_file({k: v.contiguous() for k, v in bfl_sd.items()}, str(bfl))
    return VaeCase(ref, {"bfl": bfl, "diffusers": folder, "diffusers-sharded": sharded})


def dit_inputs(batch: int = 2, height: int = 4, width: int = 6, txt: int = 7, seed: int = 0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(batch, height * width, IN_CHANNELS, generator=gen),
        "x_ids": image_ids(batch, height, width),
        "timesteps": torch.rand(batch, generator=gen),
        "ctx": torch.randn(batch, txt, CONTEXT_DIM, generator=gen),
        "ctx_ids": text_ids(batch, txt),
        "guidance": 1.0 + 4.0 * torch.rand(batch, generator=gen),
    }


@torch.no_grad()
def run_reference(ref: nn.Module, inp: dict[str, Any], guidance: bool, **extra: Any) -> Tensor:
    """The diffusers forward on our inputs (diffusers takes times in [0, 1] and scales them itself)."""
    out: Tensor = ref(
        hidden_states=inp["x"],
        encoder_hidden_states=inp["ctx"],
        timestep=inp["timesteps"],
        img_ids=inp["x_ids"],
        txt_ids=inp["ctx_ids"],
        guidance=inp["guidance"] if guidance else None,
        **extra,
    ).sample
    return out


@pytest.fixture(scope="session")
def helpers() -> ModuleType:
    """This module: test modules cannot import conftest under --import-mode=importlib."""
    return sys.modules[__name__]
