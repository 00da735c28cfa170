"""The runtime: builtins, tolerant entry-point loading, allow/block lists, strict mode, registries."""

from __future__ import annotations

import types
from collections.abc import Callable

import pytest
from diffstudio import hookimpl
from diffstudio.errors import DuplicateRegistrationError, PluginLoadError
from diffstudio.runtime import Runtime, incompatible_requirements
from diffstudio.types import PipelineSpec, SchedulerSpec


def _plugin_module(name: str, **hooks: Callable[..., object]) -> types.ModuleType:
    module = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        setattr(module, hook_name, hookimpl(fn))
    return module


def test_builtins_registered_through_the_plugin_path() -> None:
    runtime = Runtime(env={}, load_entrypoints=False)
    statuses = {s.name: s for s in runtime.statuses}
    assert statuses["builtin.fallbacks"].status == "builtin"
    assert "vram_policy" in statuses["builtin.fallbacks"].hooks
    assert {"plugins", "run"} <= set(runtime.hooks.commands().names())
    assert {"flux1", "flux2", "static"} <= set(runtime.hooks.schedulers().names())


def test_non_essential_builtin_can_be_blocked() -> None:
    runtime = Runtime(env={"DIFFSTUDIO_DISABLED_PLUGINS": "schedulers"}, load_entrypoints=False)
    assert "flux2" not in runtime.hooks.schedulers()
    blocked = [s for s in runtime.statuses if s.status == "blocked"]
    assert [s.name for s in blocked] == ["builtin.schedulers"]


def test_essential_builtin_cannot_be_blocked() -> None:
    runtime = Runtime(env={"DIFFSTUDIO_DISABLED_PLUGINS": "fallbacks,commands"}, load_entrypoints=False)
    assert "run" in runtime.hooks.commands()


def test_each_runtime_owns_its_manager() -> None:
    a = Runtime(env={}, load_entrypoints=False)
    b = Runtime(env={}, load_entrypoints=False)
    assert a.pm is not b.pm
    a.register(_plugin_module("extra", register_pipelines=lambda register: register(
        PipelineSpec("x", "x", lambda: object, "x"))))
    assert "x" in a.hooks.pipelines()
    assert "x" not in b.hooks.pipelines()


def test_duplicate_registration_names_both_owners() -> None:
    def reg(register: Callable[[SchedulerSpec], None]) -> None:
        register(SchedulerSpec("flux2", lambda: None, "dup"))

    runtime = Runtime(env={}, load_entrypoints=False, strict=True,
                      plugins=[_plugin_module("dupmod", register_schedulers=reg)])
    with pytest.raises(DuplicateRegistrationError) as info:
        runtime.hooks.schedulers()
    assert "builtin.schedulers" in str(info.value) and "dupmod" in str(info.value)


def test_registries_refresh_after_register_and_unregister() -> None:
    runtime = Runtime(env={}, load_entrypoints=False)
    assert "y" not in runtime.hooks.pipelines()
    name = runtime.register(_plugin_module("ymod", register_pipelines=lambda register: register(
        PipelineSpec("y", "y", lambda: object, "y"))))
    assert "y" in runtime.hooks.pipelines()
    runtime.unregister(name)
    assert "y" not in runtime.hooks.pipelines()


def test_env_plugins_module_loaded_and_failure_reported(capsys: pytest.CaptureFixture[str]) -> None:
    env = {"DIFFSTUDIO_PLUGINS": "diffstudio_template_sdk.testing.toy_plugin,no_such_module_xyz"}
    runtime = Runtime(env=env, load_entrypoints=False)
    statuses = {s.name: s for s in runtime.statuses}
    assert statuses["diffstudio_template_sdk.testing.toy_plugin"].status == "loaded"
    assert statuses["no_such_module_xyz"].status == "failed"
    assert "ModuleNotFoundError" in (statuses["no_such_module_xyz"].error or "")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no_such_module_xyz" in err


def test_strict_mode_makes_failures_fatal() -> None:
    with pytest.raises(PluginLoadError, match="no_such_module_xyz"):
        Runtime(env={"DIFFSTUDIO_PLUGINS": "no_such_module_xyz", "DIFFSTUDIO_STRICT_PLUGINS": "1"},
                load_entrypoints=False)


def test_blocked_plugin_cannot_register() -> None:
    runtime = Runtime(env={"DIFFSTUDIO_DISABLED_PLUGINS": "toyblock"}, load_entrypoints=False)
    with pytest.raises(PluginLoadError, match="blocked"):
        runtime.register(_plugin_module("m"), name="toyblock")


class _FakeDist:
    def __init__(self, requires: list[str]) -> None:
        self.requires = requires


def test_incompatible_core_requirement_detected() -> None:
    assert incompatible_requirements(_FakeDist(["diffstudio-core~=0.1.0"])) == []  # type: ignore[arg-type]
    problems = incompatible_requirements(_FakeDist(["diffstudio-core>=9"]))  # type: ignore[arg-type]
    assert problems and "diffstudio-core" in problems[0] and "0.1.0" in problems[0]
    extra_only = ["diffstudio-core>=9; extra == 'future'"]
    assert incompatible_requirements(_FakeDist(extra_only)) == []  # type: ignore[arg-type]


def test_trace_hooks_prints_calls(capsys: pytest.CaptureFixture[str]) -> None:
    runtime = Runtime(env={"DIFFSTUDIO_TRACE_HOOKS": "1"}, load_entrypoints=False)
    runtime.hooks.template_cache_merge("k", [1, 1], pipeline=None)  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert "template_cache_merge[builtin.fallbacks](key, values, pipeline)" in err
    assert "template_cache_merge[builtin.fallbacks] -> 1" in err


def test_fallback_merge_accepts_equal_and_rejects_conflicts() -> None:
    from diffstudio.errors import CacheMergeError

    runtime = Runtime(env={}, load_entrypoints=False)
    assert runtime.hooks.template_cache_merge("k", [3, 3], pipeline=None) == 3  # type: ignore[arg-type]
    with pytest.raises(CacheMergeError, match="'k'"):
        runtime.hooks.template_cache_merge("k", [3, 4], pipeline=None)  # type: ignore[arg-type]


def test_fallback_vram_policy_is_resident() -> None:
    import torch
    from diffstudio.types import MemoryBudget, VramStrategy

    runtime = Runtime(env={}, load_entrypoints=False)
    f32 = torch.float32
    budget = MemoryBudget("cpu", f32, "cpu", f32, "cpu", f32, "cpu", f32, None)
    strategy = runtime.hooks.vram_policy(torch.nn.Linear(2, 2), "dit", budget, pipeline=None)  # type: ignore[arg-type]
    assert isinstance(strategy, VramStrategy) and strategy.name == "resident"


def test_plugin_vram_policy_wins_for_its_model_only() -> None:
    import torch
    from diffstudio.builtin.fallbacks import ResidentStrategy
    from diffstudio.types import MemoryBudget

    class Mine(ResidentStrategy):
        name = "mine"

    def policy(model: object, component: str) -> object:
        return Mine("cpu") if component == "special" else None

    runtime = Runtime(env={}, load_entrypoints=False, plugins=[_plugin_module("pol", vram_policy=policy)])
    f32 = torch.float32
    budget = MemoryBudget("cpu", f32, "cpu", f32, "cpu", f32, "cpu", f32, None)
    model = torch.nn.Linear(2, 2)
    assert runtime.hooks.vram_policy(model, "special", budget, None).name == "mine"  # type: ignore[arg-type]
    assert runtime.hooks.vram_policy(model, "dit", budget, None).name == "resident"  # type: ignore[arg-type]
