"""InfiniteYou test fixtures: a tiny perturbed InfuseNet in the published folder layout, a tiny image projector in
the published pickle layout (and converted), a tiny IR-SE ArcFace, and the FLUX.1 repository with a deterministic VAE.

The FLUX.1 kit (``fx``, ``helpers``, ``fp``) comes from the root ``conftest.py``; the InfuseNet is sized to the
tiny FLUX.1 models (2 heads of 32 channels, T5 width 24, CLIP width 20) and the projector outputs T5 width.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn

PROJ = {"dim": 32, "depth": 2, "dim_head": 64, "heads": 2, "num_queries": 8, "embedding_dim": 512, "ff_mult": 2.0}


@torch.no_grad()
def perturb_plain(model: nn.Module, seed: int) -> None:
    """Seeded random parameters and BatchNorm statistics of a sensible scale (norm gains away from 1)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if p.ndim == 1 and name.endswith("weight"):
            p.copy_(1.0 + 0.3 * noise)
        else:
            fan_in = p[0].numel() if p.ndim > 1 else 16
            p.copy_(noise / fan_in**0.5)
    for name, b in model.named_buffers():
        if name.endswith("running_mean"):
            b.copy_(0.1 * torch.randn(b.shape, generator=gen))
        elif name.endswith("running_var"):
            b.copy_(0.5 + torch.rand(b.shape, generator=gen))


@dataclass
class Files:
    """The tiny InfiniteYou models and where they were saved."""

    infusenet: Any  # diffusers FluxControlNetModel
    infusenet_folder: Path
    projector: Any  # diffstudio_infiniteyou Resampler
    projector_bin: Path  # {"image_proj": state_dict} pickle, as published
    projector_file: Path  # after diffstudio convert
    arcface: Any
    arcface_file: Path


def tiny_infusenet(helpers: ModuleType, fx: ModuleType, seed: int, layers: int = 1, single: int = 1) -> Any:
    """A tiny perturbed diffusers ``FluxControlNetModel`` with a guidance embedder (the InfuseNet's layout)."""
    from diffusers import FluxControlNetModel

    model = FluxControlNetModel(
        in_channels=64, num_layers=layers, num_single_layers=single, attention_head_dim=helpers.HEAD_DIM,
        num_attention_heads=helpers.HEADS, joint_attention_dim=fx.T5_HIDDEN, pooled_projection_dim=fx.CLIP_HIDDEN,
        guidance_embeds=True, axes_dims_rope=helpers.AXES,
    )  # fmt: skip
    helpers.perturb(model, seed)
    return model.eval()


def tiny_projector(fx: ModuleType, seed: int) -> Any:
    from diffstudio_infiniteyou.resampler import Resampler, ResamplerParams

    model = Resampler(ResamplerParams(output_dim=fx.T5_HIDDEN, **PROJ))  # type: ignore[arg-type]
    perturb_plain(model, seed)
    return model.eval()


@pytest.fixture(scope="session")
def files(tmp_path_factory: pytest.TempPathFactory, helpers: ModuleType, fx: ModuleType) -> Files:
    from diffstudio.builtin.convert_command import convert_pickle
    from diffstudio_infiniteyou.arcface import ArcFaceIRSE
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("infu_flux_v1.0") / "aes_stage2"
    infusenet = tiny_infusenet(helpers, fx, 70)
    infusenet.save_pretrained(root / "InfuseNetModel")
    projector = tiny_projector(fx, 71)
    torch.save({"image_proj": projector.state_dict()}, root / "image_proj_model.bin")
    convert_pickle(root / "image_proj_model.bin", root / "image_proj_model.safetensors")
    arcface = ArcFaceIRSE(units=(1, 1, 1, 1))
    perturb_plain(arcface, 72)
    arcface.eval()
    save_file({k: v.contiguous() for k, v in arcface.state_dict().items()}, str(root / "arcface.safetensors"))
    return Files(infusenet, root / "InfuseNetModel", projector, root / "image_proj_model.bin",
                 root / "image_proj_model.safetensors", arcface, root / "arcface.safetensors")  # fmt: skip


@pytest.fixture(scope="session")
def repo(tmp_path_factory: pytest.TempPathFactory, helpers: ModuleType, fp: ModuleType) -> Any:
    """The tiny FLUX.1 repository with a (numerically) deterministic VAE posterior (as diffstudio-controlnet's)."""
    built = fp.build_repo(tmp_path_factory.mktemp("infiniteyou-repo"), helpers, seed=3)
    vae = built.components["vae"]
    with torch.no_grad():
        half = vae.encoder.conv_out.out_channels // 2
        vae.encoder.conv_out.weight[half:] = 0
        vae.encoder.conv_out.bias[half:] = -30.0
    vae.save_pretrained(built.root / "vae")
    return built


@pytest.fixture(scope="session")
def plain_controlnet(tmp_path_factory: pytest.TempPathFactory, helpers: ModuleType, fx: ModuleType) -> Path:
    """A tiny plain ControlNet folder (the same layout as the InfuseNet, another folder name)."""
    folder = tmp_path_factory.mktemp("controlnets") / "FLUX.1-dev-Controlnet-Canny"
    tiny_infusenet(helpers, fx, 80).save_pretrained(folder)
    return folder
