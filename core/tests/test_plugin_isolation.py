"""Plugins are isolated at every hook call, not only while they import (issue 21, finding 8).

A hook implementation that raises or returns what its hookspec forbids names its plugin, is shown as failed by
``runtime.statuses`` (what ``diffstudio plugins`` prints) and, outside strict mode, the host goes on without
it. A misspelt hook name or a ``SystemExit`` while importing fails only that plugin.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from diffstudio import ModelConfig, hookimpl
from diffstudio.errors import DuplicateRegistrationError, PipelineInputError, PluginHookError, PluginLoadError
from diffstudio.runtime import Runtime
from diffstudio.types import CommandSpec, MemoryBudget, SchedulerSpec
from diffstudio_template_sdk.testing import toy, toy_plugin


def _module(name: str, **hooks: Callable[..., Any]) -> types.ModuleType:
    module = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        setattr(module, hook_name, hookimpl(fn))
    return module


def _status(runtime: Runtime, name: str) -> Any:
    return next(s for s in runtime.statuses if s.name == name)


@pytest.fixture(scope="module")
def toy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return toy.write_toy_checkpoint(tmp_path_factory.mktemp("toy") / "toy.safetensors")


def _toy_pipe(runtime: Runtime, toy_file: Path) -> toy.ToyPipeline:
    return toy.ToyPipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", runtime=runtime, model_configs=[ModelConfig(path=str(toy_file))]
    )


def _raise(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("plugin bug on purpose")


def test_load_model_hook_that_raises_is_disabled_and_named(toy_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = _module("badload", load_model=lambda checkpoint: _raise())
    runtime = Runtime(env={}, load_entrypoints=False, plugins=[toy_plugin, bad])
    pipe = _toy_pipe(runtime, toy_file)  # the run goes on without the plugin
    assert pipe.has("dit")
    status = _status(runtime, "badload")
    assert status.status == "failed"
    assert "load_model" in status.error and "RuntimeError: plugin bug on purpose" in status.error
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'badload'" in err and "load_model" in err
    assert runtime.pm.get_plugin("badload") is None
    assert "badload (failed, see `diffstudio plugins`)" in runtime.hooks.families_asked()
    runtime.unregister("badload")  # a test fixture's clean-up after the plugin was disabled


def test_load_model_hook_returning_garbage_is_disabled(toy_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = _module("garbageload", load_model=lambda checkpoint: "flux2-dit, trust me")
    runtime = Runtime(env={}, load_entrypoints=False, plugins=[toy_plugin, bad])
    assert _toy_pipe(runtime, toy_file).has("dit")
    status = _status(runtime, "garbageload")
    assert status.status == "failed" and "expected a ModelClaim" in status.error
    assert "garbageload" in capsys.readouterr().err


def test_pipeline_unit_hook_that_raises_or_returns_garbage_is_disabled(
    toy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raising = _module("unitraise", pipeline_unit=lambda pipeline: _raise())
    garbage = _module("unitgarbage", pipeline_unit=lambda pipeline: [object()])
    not_a_list = _module("unitnotalist", pipeline_unit=lambda pipeline: 42)
    runtime = Runtime(env={}, load_entrypoints=False, plugins=[toy_plugin, raising, garbage, not_a_list])
    pipe = _toy_pipe(runtime, toy_file)
    image = pipe("x", seed=1, num_inference_steps=1, output_type="pt")
    assert image.shape[-2:] == (32, 32)
    assert {pipe.unit_owner(unit.name) for unit in pipe.units} == {toy_plugin.__name__}
    failed = {s.name: s.error for s in runtime.failed()}
    assert set(failed) == {"unitraise", "unitgarbage", "unitnotalist"}
    assert "RuntimeError" in failed["unitraise"] and "PipelineUnit" in failed["unitgarbage"]
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("diffstudio: plugin")]
    assert len(warnings) == 3


def test_strict_mode_makes_hook_failures_fatal(toy_file: Path) -> None:
    bad = _module("strictbad", load_model=lambda checkpoint: _raise())
    runtime = Runtime(env={"DIFFSTUDIO_STRICT_PLUGINS": "1"}, load_entrypoints=False, plugins=[toy_plugin, bad])
    with pytest.raises(PluginHookError, match="'strictbad'.*load_model.*RuntimeError.*STRICT") as info:
        _toy_pipe(runtime, toy_file)
    assert info.value.plugin == "strictbad" and info.value.hook == "load_model"
    assert isinstance(info.value.__cause__, RuntimeError)


def test_typed_error_from_a_loading_hook_propagates(toy_file: Path) -> None:
    def load_model(checkpoint: Any) -> None:
        raise PipelineInputError("the file says something the user must fix")

    runtime = Runtime(env={}, load_entrypoints=False, plugins=[toy_plugin, _module("typed", load_model=load_model)])
    with pytest.raises(PipelineInputError, match="the user must fix"):
        _toy_pipe(runtime, toy_file)
    assert _status(runtime, "typed").status == "loaded"


def test_garbage_register_commands_does_not_break_the_listing(capsys: pytest.CaptureFixture[str]) -> None:
    def wrong_type(register: Callable[[Any], None]) -> None:
        register("shapes-data")

    def half_good(register: Callable[[Any], None]) -> None:
        register(CommandSpec("fine-command", "ok", lambda parser: None, lambda args, runtime: 0))
        register(CommandSpec("bad name", "spaces", lambda parser: None, lambda args, runtime: 0))

    def returns_list(register: Callable[[Any], None]) -> list[CommandSpec]:
        return [CommandSpec("returned", "x", lambda parser: None, lambda args, runtime: 0)]

    plugins = [
        _module("cmdtype", register_commands=wrong_type),
        _module("cmdhalf", register_commands=half_good),
        _module("cmdreturn", register_commands=returns_list),
        _module("cmdraise", register_commands=lambda register: _raise()),
    ]
    runtime = Runtime(env={}, load_entrypoints=False, plugins=plugins)
    names = runtime.hooks.commands().names()
    assert "plugins" in names and "run" in names
    assert "fine-command" not in names  # a failed plugin's registrations are all rolled back
    failed = {s.name: s.error for s in runtime.failed()}
    assert set(failed) == {"cmdtype", "cmdhalf", "cmdreturn", "cmdraise"}
    assert "expected a CommandSpec" in failed["cmdtype"]
    assert "not a valid command name" in failed["cmdhalf"]
    assert "must call register" in failed["cmdreturn"]
    assert len(capsys.readouterr().err.splitlines()) == 4


def test_duplicate_registration_disables_the_later_plugin(capsys: pytest.CaptureFixture[str]) -> None:
    def reg(register: Callable[[SchedulerSpec], None]) -> None:
        register(SchedulerSpec("flux2", lambda: None, "dup"))

    runtime = Runtime(env={}, load_entrypoints=False, plugins=[_module("dupmod", register_schedulers=reg)])
    assert runtime.hooks.schedulers().owner("flux2") == "builtin.schedulers"
    error = _status(runtime, "dupmod").error
    assert "registered twice" in error and "builtin.schedulers" in error
    assert "dupmod" in capsys.readouterr().err
    strict = Runtime(env={"DIFFSTUDIO_STRICT_PLUGINS": "1"}, load_entrypoints=False,
                     plugins=[_module("dupmod", register_schedulers=reg)])
    with pytest.raises(DuplicateRegistrationError, match="'builtin.schedulers'.*'dupmod'"):
        strict.hooks.schedulers()


def _write_module(folder: Path, name: str, source: str) -> str:
    (folder / f"{name}.py").write_text(source)
    return name


def test_misspelled_hook_name_fails_only_that_plugin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    misspelt = _write_module(tmp_path, "h6_misspelt", (
        "from diffstudio import hookimpl\n"
        "@hookimpl\ndef load_modle(checkpoint):\n    return None\n"
    ))  # fmt: skip
    good = _write_module(
        tmp_path, "h6_good", "from diffstudio import hookimpl\n@hookimpl\ndef pipeline_unit():\n    return None\n"
    )
    runtime = Runtime(env={"DIFFSTUDIO_PLUGINS": f"{misspelt},{good}"}, load_entrypoints=False)
    assert _status(runtime, good).status == "loaded"
    status = _status(runtime, misspelt)
    assert status.status == "failed" and "'load_modle'" in status.error and "did you mean 'load_model'" in status.error
    assert runtime.pm.get_plugin(misspelt) is None
    runtime.pm.check_pending()  # nothing unknown is left behind
    assert misspelt in capsys.readouterr().err
    with pytest.raises(PluginLoadError, match="load_modle"):
        Runtime(env={}, load_entrypoints=False).register(_module("m2", load_modle=lambda checkpoint: None))


def test_systemexit_on_import_is_a_failed_plugin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    name = _write_module(tmp_path, "h6_exits", "raise SystemExit(3)\n")
    runtime = Runtime(env={"DIFFSTUDIO_PLUGINS": name}, load_entrypoints=False)
    status = _status(runtime, name)
    assert status.status == "failed" and "SystemExit(3)" in status.error
    assert name in capsys.readouterr().err
    with pytest.raises(PluginLoadError, match="SystemExit"):
        Runtime(env={"DIFFSTUDIO_PLUGINS": name, "DIFFSTUDIO_STRICT_PLUGINS": "1"}, load_entrypoints=False)


def test_vram_policy_and_cache_merge_failures_fall_back_to_core(capsys: pytest.CaptureFixture[str]) -> None:
    plugins = [
        _module("badpolicy", vram_policy=lambda model: "all on the GPU please"),
        _module("badmerge", template_cache_merge=lambda key: _raise()),
    ]
    runtime = Runtime(env={}, load_entrypoints=False, plugins=plugins)
    f32 = torch.float32
    budget = MemoryBudget("cpu", f32, "cpu", f32, "cpu", f32, "cpu", f32, None)
    strategy = runtime.hooks.vram_policy(torch.nn.Linear(2, 2), "dit", budget, None)  # type: ignore[arg-type]
    assert strategy.name == "resident"
    assert runtime.hooks.template_cache_merge("k", [3, 3], None) == 3  # type: ignore[arg-type]
    assert {s.name for s in runtime.failed()} == {"badpolicy", "badmerge"}
    assert len(capsys.readouterr().err.splitlines()) == 2


def test_trace_hooks_traces_every_hook_with_its_plugin(capsys: pytest.CaptureFixture[str]) -> None:
    runtime = Runtime(env={"DIFFSTUDIO_TRACE_HOOKS": "1"}, load_entrypoints=False, plugins=[toy_plugin])
    runtime.hooks.pipelines()
    runtime.hooks.schedulers()
    err = capsys.readouterr().err
    assert f"register_pipelines[{toy_plugin.__name__}](register)" in err
    assert "register_schedulers[builtin.schedulers] -> " in err
