"""Qwen2.5-VL slot fixtures: the tiny processor folder and models in both key layouts (built once per session)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def qfx() -> ModuleType:
    import fixtures_qwen_vl

    return fixtures_qwen_vl


@pytest.fixture(scope="session")
def qwen_repo(tmp_path_factory: pytest.TempPathFactory, qfx: ModuleType) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("qwen_vl")
    tokens = qfx.build_processor(root / "processor")
    reference = qfx.build_model(root / "legacy", tokens, "legacy", seed=3)
    qfx.build_model(root / "transformers5", tokens, "transformers5", seed=3)
    return {"root": root, "tokens": tokens, "reference": reference}


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
