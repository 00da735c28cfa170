"""ControlNet test fixtures: tiny perturbed diffusers ``FluxControlNetModel`` s, a repository with a deterministic VAE.

The FLUX.1 helpers (``fx``, ``helpers``, ``fp``) come from the root ``conftest.py``; the ControlNets are sized to
match its tiny FLUX.1 models (2 heads of 32 channels, T5 width 24, CLIP width 20).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest


def diffusers_controlnet(h: ModuleType, fx: ModuleType, seed: int, *, modes: int | None = None, extra: int = 0,
                         layers: int = 1, single: int = 1, guidance: bool = True) -> Any:  # fmt: skip
    """A tiny perturbed ``FluxControlNetModel`` (Union with ``modes``; ``extra`` condition channels).

    ``h`` and ``fx`` are the FLUX.1 helpers (the ``helpers`` and ``fx`` fixtures) that give the sizes.
    """
    from diffusers import FluxControlNetModel

    model = FluxControlNetModel(
        in_channels=64, num_layers=layers, num_single_layers=single, attention_head_dim=h.HEAD_DIM,
        num_attention_heads=h.HEADS, joint_attention_dim=fx.T5_HIDDEN, pooled_projection_dim=fx.CLIP_HIDDEN,
        guidance_embeds=guidance, axes_dims_rope=h.AXES, num_mode=modes,
    )  # fmt: skip
    if extra:  # alimama's Inpainting layout: the condition has 4 more channels (the packed mask)
        import torch

        model.controlnet_x_embedder = torch.nn.Linear(64 + extra, model.inner_dim)
    h.perturb(model, seed)
    return model.eval()


@pytest.fixture(scope="session")
def repo(tmp_path_factory: pytest.TempPathFactory, helpers: ModuleType, fp: ModuleType) -> Any:
    """A tiny FLUX.1 repository whose VAE posterior is (numerically) deterministic.

    diffusers' ControlNet pipelines *sample* the control image's latents; setting the log-variance half of the
    encoder's output to -30 makes that sample equal the posterior mean that diffstudio uses.
    """
    import torch

    built = fp.build_repo(tmp_path_factory.mktemp("controlnet-repo"), helpers, seed=3)
    vae = built.components["vae"]
    with torch.no_grad():
        half = vae.encoder.conv_out.out_channels // 2
        vae.encoder.conv_out.weight[half:] = 0
        vae.encoder.conv_out.bias[half:] = -30.0
    vae.save_pretrained(built.root / "vae")
    return built


@pytest.fixture(scope="session")
def controlnet_files(tmp_path_factory: pytest.TempPathFactory, helpers: ModuleType, fx: ModuleType) -> dict[str, Any]:
    """Plain, Union (3 modes) and Inpainting tiny ControlNets saved as diffusers folders."""
    root = tmp_path_factory.mktemp("controlnets")
    models = {
        "plain": diffusers_controlnet(helpers, fx, 30, layers=1, single=1),
        "union": diffusers_controlnet(helpers, fx, 31, modes=3, layers=2, single=1),
        "inpainting": diffusers_controlnet(helpers, fx, 32, extra=4, layers=1, single=0),
    }
    out = {}
    for name, model in models.items():
        model.save_pretrained(root / name)
        out[name] = (model, root / name)
    return out
