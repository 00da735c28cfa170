"""Shared fixtures: the FLUX.1 family's tiny-model helpers (loaded from ``plugins/flux1/tests``) and ControlNets.

The FLUX.1 test helpers build tiny perturbed models in the official layouts and a tiny on-disk FLUX.1 repository
with diffusers pipelines over the same files; the ControlNets here are tiny perturbed diffusers
``FluxControlNetModel`` s sized to match (2 heads of 32 channels, T5 width 24, CLIP width 20).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

FLUX1_TESTS = Path(__file__).resolve().parents[2] / "flux1" / "tests"


def flux1_helper(name: str) -> ModuleType:
    """Import ``plugins/flux1/tests/<name>.py`` under the key the flux1 tests use."""
    key = f"diffstudio_flux1_tests_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, FLUX1_TESTS / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def diffusers_controlnet(seed: int, *, modes: int | None = None, extra: int = 0, layers: int = 1,
                         single: int = 1, guidance: bool = True) -> Any:  # fmt: skip
    """A tiny perturbed ``FluxControlNetModel`` (Union with ``modes``; ``extra`` condition channels)."""
    from diffusers import FluxControlNetModel

    h = flux1_helper("conftest")
    fx = flux1_helper("fixtures_text")
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
def fx() -> ModuleType:
    """FLUX.1 text fixtures (sizes)."""
    return flux1_helper("fixtures_text")


@pytest.fixture(scope="session")
def helpers() -> ModuleType:
    """FLUX.1 model helpers (perturb, load, sizes)."""
    return flux1_helper("conftest")


@pytest.fixture(scope="session")
def fp() -> ModuleType:
    """FLUX.1 pipeline fixtures (tiny repository, noise, images)."""
    return flux1_helper("fixtures_pipeline")


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
def controlnet_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Plain, Union (3 modes) and Inpainting tiny ControlNets saved as diffusers folders."""
    root = tmp_path_factory.mktemp("controlnets")
    models = {
        "plain": diffusers_controlnet(30, layers=1, single=1),
        "union": diffusers_controlnet(31, modes=3, layers=2, single=1),
        "inpainting": diffusers_controlnet(32, extra=4, layers=1, single=0),
    }
    out = {}
    for name, model in models.items():
        model.save_pretrained(root / name)
        out[name] = (model, root / name)
    return out
