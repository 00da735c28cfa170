"""The registration hooks that no builtin uses yet: embedded models, LoRA formats, converters, templates."""

from __future__ import annotations

import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from diffstudio import ModelConfig, hookimpl
from diffstudio.errors import DuplicateRegistrationError
from diffstudio.loading.convert import Converter
from diffstudio.registry import UnknownNameError
from diffstudio.runtime import Runtime
from diffstudio.types import EmbeddedModel, LoraFormat, TemplateSpec
from diffstudio_template_sdk.testing import toy, toy_plugin


def _module(name: str, **hooks: Callable[..., Any]) -> types.ModuleType:
    module = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        setattr(module, hook_name, hookimpl(fn))
    return module


def test_embedded_model_resolves_offline_and_loads(tmp_path: Path) -> None:
    toy.write_toy_checkpoint(tmp_path / "dit" / "toy.safetensors")

    def register_embedded_models(register: Callable[[EmbeddedModel], None]) -> None:
        register(EmbeddedModel("diffstudio/toy", tmp_path, "toy", "toy model", ("dit/*.safetensors",)))

    runtime = Runtime(env={}, load_entrypoints=False,
                      plugins=[toy_plugin, _module("emb", register_embedded_models=register_embedded_models)])
    assert runtime.hooks.embedded_models().get("diffstudio/toy").root == tmp_path
    pipe = toy.ToyPipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", runtime=runtime,
        model_configs=[ModelConfig(model_id="diffstudio/toy", origin_file_pattern="dit/*.safetensors")],
    )
    assert pipe.has("dit")


def test_lora_format_converter_and_template_registries() -> None:
    def register_lora_formats(register: Callable[[LoraFormat], None]) -> None:
        register(LoraFormat("toy/peft", "toy", lambda keys: any("lora_A" in k for k in keys), dict))

    def register_converters(register: Callable[[Converter], None]) -> None:
        register(Converter("convert_toy_to_toy", "toy", "toy", dict))

    def register_templates(register: Callable[[TemplateSpec], None]) -> None:
        register(TemplateSpec("toy-template", lambda: object, "test template"))

    runtime = Runtime(env={}, load_entrypoints=False, plugins=[_module(
        "regs", register_lora_formats=register_lora_formats, register_converters=register_converters,
        register_templates=register_templates)])
    assert runtime.hooks.lora_formats().get("toy/peft").detect(["x.lora_A.weight"])
    assert runtime.hooks.converters().get("convert_toy_to_toy").target == "toy"
    assert runtime.hooks.templates().names() == ["toy-template"]
    assert runtime.hooks.templates().owner("toy-template") == "regs"
    with pytest.raises(UnknownNameError, match="No template named 'nope'.*toy-template"):
        runtime.hooks.templates().get("nope")


def test_duplicate_embedded_model_rejected(tmp_path: Path) -> None:
    def reg(register: Callable[[EmbeddedModel], None]) -> None:
        register(EmbeddedModel("a/b", tmp_path, "toy", "x"))

    plugins = [_module("one", register_embedded_models=reg), _module("two", register_embedded_models=reg)]
    runtime = Runtime(env={}, load_entrypoints=False, strict=True, plugins=plugins)
    with pytest.raises(DuplicateRegistrationError, match="'one'.*'two'|'two'.*'one'"):
        runtime.hooks.embedded_models()
