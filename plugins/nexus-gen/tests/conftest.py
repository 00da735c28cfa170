"""Nexus-Gen test fixtures over ``fixtures_nexus_gen.py`` (tiny AR model folder, reference image, kits)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from diffstudio.testing import import_file

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def ng() -> ModuleType:
    """This package's test helpers."""
    return import_file(HERE / "fixtures_nexus_gen.py")


@pytest.fixture(scope="session")
def qv(qwen_vl_kit: ModuleType) -> ModuleType:
    """The shared Qwen2.5-VL test kit (the root conftest's ``qwen_vl_kit``)."""
    return qwen_vl_kit


@pytest.fixture(scope="session")
def ar_files(tmp_path_factory: pytest.TempPathFactory, qv: ModuleType, ng: ModuleType) -> Any:
    """The tiny AR model in the pre-4.52 key layout (as Nexus-GenV2 ships it)."""
    return ng.make_ar(tmp_path_factory.mktemp("nexus-gen-ar"), qv)


@pytest.fixture(scope="session")
def reference_image(ng: ModuleType) -> Any:
    """A smooth random RGB image of ``ng.REF_SIZE``."""
    return ng.reference_image()


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    """Every test of this package runs on one torch thread (the root conftest's ``one_torch_thread``)."""
