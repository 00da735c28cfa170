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


# One torch thread while this package's tests run (restored after each): its models are tiny, and on a shared
# 2-core machine two spinning intra-op threads made them 3-10x slower (step1x training: 142 s -> 14 s wall at load
# average 15). Set in setup and restored in teardown, so other packages' tests keep the session's setting.
_THREADS: list[int] = []


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    import torch

    _THREADS.append(torch.get_num_threads())
    torch.set_num_threads(1)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    yield
    if _THREADS:
        import torch

        torch.set_num_threads(_THREADS.pop())
