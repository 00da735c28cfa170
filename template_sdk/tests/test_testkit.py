"""The SDK facade and its pytest test kit."""

from __future__ import annotations

import subprocess
import sys
import types
from collections.abc import Callable

import diffstudio_template_sdk as sdk
import pytest
from diffstudio.runtime import Runtime
from diffstudio.types import PipelineSpec


def _plugin() -> types.ModuleType:
    module = types.ModuleType("kit_plugin")

    def register_pipelines(register: Callable[[PipelineSpec], None]) -> None:
        register(PipelineSpec("kit", "kit", lambda: object, "test"))

    module.register_pipelines = sdk.hookimpl(register_pipelines)  # type: ignore[attr-defined]
    return module


def test_sdk_import_is_cheap() -> None:
    code = "import sys, diffstudio_template_sdk; sys.exit(3 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_sdk_reexports_stable_names() -> None:
    from diffstudio.pipeline.units import PipelineUnit

    assert sdk.PipelineUnit is PipelineUnit
    assert sdk.SDK_VERSION.split(".")[0] == "1"
    with pytest.raises(AttributeError):
        _ = sdk.NotAName  # type: ignore[attr-defined]


def test_fresh_runtime_has_builtins_only(diffstudio_runtime: Runtime) -> None:
    assert all(s.distribution == "diffstudio-core" for s in diffstudio_runtime.statuses)


class TestRegisterPlugin:
    runtime: Runtime | None = None

    def test_registers(self, diffstudio_runtime: Runtime, register_plugin: Callable[..., str]) -> None:
        register_plugin(_plugin())
        assert "kit" in diffstudio_runtime.hooks.pipelines()
        TestRegisterPlugin.runtime = diffstudio_runtime

    def test_unregistered_after_the_test(self) -> None:
        runtime = TestRegisterPlugin.runtime
        assert runtime is not None
        assert "kit" not in runtime.hooks.pipelines()
        assert runtime.pm.get_plugin("kit_plugin") is None
