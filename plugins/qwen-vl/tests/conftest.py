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


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    """Every test of this package runs on one torch thread (the root conftest's ``one_torch_thread``)."""
