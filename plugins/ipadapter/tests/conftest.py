"""Shared fixtures: the FLUX.1 family's tiny-model helpers (loaded from ``plugins/flux1/tests``).

They build tiny perturbed models in the official layouts and a tiny on-disk FLUX.1 repository (2 heads of 32
channels, T5 width 24, CLIP width 20) with diffusers pipelines over the same files.
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
    """A tiny FLUX.1 repository (transformer, VAE, CLIP, T5 and tokenizers) with the diffusers components."""
    return fp.build_repo(tmp_path_factory.mktemp("flux1-repo"), helpers, seed=5)


@pytest.fixture(scope="session")
def encoders(tmp_path_factory: pytest.TempPathFactory, helpers: ModuleType) -> dict[str, Any]:
    """Tiny perturbed CLIP (with projection) and SigLIP vision encoders saved as transformers folders."""
    import transformers

    root = tmp_path_factory.mktemp("image-encoders")
    common = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}  # fmt: skip
    clip = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(projection_dim=16, **common))
    siglip = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**common))
    out = {}
    for name, model, seed in (("clip", clip, 1), ("siglip", siglip, 2)):
        helpers.perturb(model, seed)
        model.eval().save_pretrained(root / name)
        out[name] = (model, root / name)
    return out
