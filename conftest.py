"""Fixtures shared by the plugins' tests (the FLUX.1 kit, the Qwen2.5-VL kit, trainer helpers) and integration tests.

They use the FLUX.1 family's tiny-model test kit, which lives with its tests (``plugins/flux1/tests``): tiny
perturbed models in the official layouts and a tiny on-disk FLUX.1 repository (2 heads of 32 channels, T5 width 24,
CLIP width 20) with diffusers pipelines over the same files. A package's own ``conftest.py`` may override any of them.

What they need, stated once: a repository checkout (the kit is test code, not part of any wheel) and the
``diffstudio-flux1[test]`` distribution (FLUX.1 itself plus its reference libraries, diffusers and tokenizers).
A plugin whose tests ask for these fixtures declares ``diffstudio-flux1[test]`` in its ``test`` extra, so
``scripts/test-isolated.sh`` installs it in that plugin's venv; without it the fixture fails with that advice,
not with an import error from inside the kit.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from diffstudio.testing import import_file

FLUX1_TESTS = Path(__file__).resolve().parent / "plugins" / "flux1" / "tests"
# the modules the kit imports beyond core: the family, and the reference libraries of flux1's test extra
FLUX1_KIT_NEEDS = {"diffstudio_flux1": "diffstudio-flux1", "diffusers": "diffusers", "tokenizers": "tokenizers"}


def flux1_helper(name: str) -> ModuleType:
    """Import ``plugins/flux1/tests/<name>.py`` under the key the flux1 tests use.

    Fails the asking test (no traceback) with what to install when the kit or one of its requirements is absent.
    """
    missing = [dist for module, dist in FLUX1_KIT_NEEDS.items() if importlib.util.find_spec(module) is None]
    if missing:
        advice = "declare 'diffstudio-flux1[test]' in the test extra of the distribution whose tests use the kit"
        pytest.fail(f"the FLUX.1 test kit (fixtures fx, helpers, fp, repo) needs {', '.join(missing)}: {advice}",
                    pytrace=False)  # fmt: skip
    path = FLUX1_TESTS / f"{name}.py"
    if not path.is_file():
        pytest.fail(f"the FLUX.1 test kit is missing ({path}): its fixtures need a repository checkout", pytrace=False)
    return import_file(path)


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
    """FLUX.1 pipeline fixtures (tiny repository, noise, images, the diffusers scheduler config)."""
    return flux1_helper("fixtures_pipeline")


@pytest.fixture(scope="session")
def repo(tmp_path_factory: pytest.TempPathFactory, helpers: ModuleType, fp: ModuleType) -> Any:
    """A tiny FLUX.1 repository (transformer, VAE, CLIP, T5 and tokenizers) with the diffusers components."""
    return fp.build_repo(tmp_path_factory.mktemp("flux1-repo"), helpers, seed=5)


QWEN_VL_TESTS = Path(__file__).resolve().parent / "plugins" / "qwen-vl" / "tests"
TRAIN_HELPERS = Path(__file__).resolve().parent / "tests" / "train" / "helpers.py"


@pytest.fixture(scope="session")
def qwen_vl_kit() -> ModuleType:
    """The shared Qwen2.5-VL test kit (``plugins/qwen-vl/tests/fixtures_qwen_vl.py``: tiny model folders, processor).

    Used by the tests of the plugins built on ``diffstudio-qwen-vl`` (Step1X-Edit, Nexus-Gen), which declare it.
    """
    if importlib.util.find_spec("diffstudio_qwen_vl") is None:
        pytest.fail("the Qwen2.5-VL test kit needs diffstudio-qwen-vl: declare it in the test extra", pytrace=False)
    path = QWEN_VL_TESTS / "fixtures_qwen_vl.py"
    if not path.is_file():
        pytest.fail(f"the Qwen2.5-VL test kit is missing ({path}): it needs a repository checkout", pytrace=False)
    return import_file(path)


@pytest.fixture(scope="session")
def train_helpers() -> ModuleType:
    """The trainer test helpers (``tests/train/helpers.py``: fixed-noise loss, gradients), core only."""
    if not TRAIN_HELPERS.is_file():
        pytest.fail(f"the trainer test helpers are missing ({TRAIN_HELPERS}): they need a checkout", pytrace=False)
    return import_file(TRAIN_HELPERS)


@pytest.fixture
def one_torch_thread() -> Any:
    """One torch intra-op thread for the test, the previous count restored after it.

    For packages of tiny models: on a shared 2-core machine two spinning intra-op threads made their tests 3-10x
    slower (step1x training: 142 s -> 14 s wall at load average 15). A package opts in with an autouse fixture in
    its conftest that requests this one, so other packages keep the session's setting.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
