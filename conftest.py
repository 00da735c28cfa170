"""Fixtures shared by the FLUX.1 adapter plugins' tests (controlnet, eligen, ipadapter) and the integration tests.

They use the FLUX.1 family's tiny-model helpers, which live with its tests (``plugins/flux1/tests``): tiny perturbed
models in the official layouts and a tiny on-disk FLUX.1 repository (2 heads of 32 channels, T5 width 24, CLIP
width 20) with diffusers pipelines over the same files. A package's own ``conftest.py`` may override any of them.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from diffstudio.testing import import_file

FLUX1_TESTS = Path(__file__).resolve().parent / "plugins" / "flux1" / "tests"


def flux1_helper(name: str) -> ModuleType:
    """Import ``plugins/flux1/tests/<name>.py`` under the key the flux1 tests use."""
    return import_file(FLUX1_TESTS / f"{name}.py")


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
