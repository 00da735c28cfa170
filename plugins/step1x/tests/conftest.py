"""Step1X fixtures: the tiny repository of ``step1x_kit`` (built once per session)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from step1x_kit import build_dit  # noqa: E402


@pytest.fixture(scope="session")
def step1x_repo(
    tmp_path_factory: pytest.TempPathFactory, helpers: ModuleType, qwen_vl_kit: ModuleType
) -> dict[str, Any]:
    from diffstudio_flux1.convert import convert_diffusers_to_bfl_vae
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("step1x")
    dit = build_dit(1)
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(root / "step1x-edit-i1258.safetensors"))
    vae = helpers.diffusers_vae(seed=2)
    save_file({k: v.contiguous() for k, v in convert_diffusers_to_bfl_vae(vae.state_dict()).items()},
              str(root / "ae.safetensors"))  # fmt: skip
    qfx = qwen_vl_kit
    tokens = qfx.build_processor(root / "qwen")
    qfx.build_model(root / "qwen", tokens, "legacy", seed=4)
    return {"root": root, "dit": dit}


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    """Every test of this package runs on one torch thread (the root conftest's ``one_torch_thread``)."""
