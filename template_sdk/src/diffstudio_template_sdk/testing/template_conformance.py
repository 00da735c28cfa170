"""``TemplateConformance``: the checks every template class must pass.

Subclass it in a template package's tests (the class name must start with ``Test``)::

    class TestBrightness(TemplateConformance):
        template_class = BrightnessTemplate
        config = {"tokens": 8}
        example_inputs = [{"scale": 0.2}, {"scale": 0.9}]
        cache_keys = {"kv_cache"}
        plugin_module = "my_package.plugin"      # optional: also check registration and export
        registered_name = "my-org/brightness"
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from diffstudio.runtime import Runtime
from diffstudio.templates import check_template_class, export_template, load_template, run_template
from diffstudio.templates.protocol import forward_template, process_template_inputs

from diffstudio_template_sdk import media

_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    media.KV_CACHE: media.check_kv_cache,
    media.LORA: media.check_lora_cache,
    media.RESIDUALS: media.check_residuals,
}


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if hasattr(value, "__dataclass_fields__"):
        return [t for name in value.__dataclass_fields__ for t in _tensors(getattr(value, name))]
    return []


class TemplateConformance:
    """Protocol, media shapes, gradients, determinism, registration and data-only export of one template.

    Attributes to set:
        template_class: The template model class.
        config: Constructor keyword arguments.
        example_inputs: Template-input dicts it must accept (at least one).
        cache_keys: The base-pipeline inputs its cache may contain.
        plugin_module: The package's entry module (empty: skip the registration and export checks).
        registered_name: The name the entry module registers the class under.
    """

    template_class: ClassVar[type[Any]]
    config: ClassVar[dict[str, Any]] = {}
    example_inputs: ClassVar[list[dict[str, Any]]] = []
    cache_keys: ClassVar[set[str]] = set()
    plugin_module: ClassVar[str] = ""
    registered_name: ClassVar[str] = ""

    def make_template(self) -> torch.nn.Module:
        """Build the template under test (override for templates that need more than ``config``)."""
        torch.manual_seed(0)
        model: torch.nn.Module = self.template_class(**self.config)
        return model.eval()

    def test_follows_the_protocol(self) -> None:
        check_template_class(self.template_class)
        assert self.example_inputs, "set example_inputs to at least one template-input dict"

    def test_cache_keys_and_media_shapes(self) -> None:
        model = self.make_template()
        for inputs in self.example_inputs:
            cache = run_template(model, inputs)
            extra = set(cache) - set(self.cache_keys)
            assert not extra, f"cache keys {sorted(extra)} are not in cache_keys {sorted(self.cache_keys)}"
            for key, value in cache.items():
                if key in _CHECKS:
                    _CHECKS[key](value, key)

    def test_process_inputs_runs_without_gradients(self) -> None:
        model = self.make_template()
        processed = process_template_inputs(model, self.example_inputs[0])
        assert not any(t.requires_grad for t in _tensors(processed)), "process_inputs must not build a graph"

    def test_forward_carries_gradients_to_the_parameters(self) -> None:
        model = self.make_template().train()
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            pytest.skip("the template has no trainable parameters")
        processed = process_template_inputs(model, self.example_inputs[-1])
        cache = forward_template(model, processed, use_gradient_checkpointing=True)
        tensors = [t for t in _tensors(cache) if t.requires_grad]
        assert tensors, "no cache tensor depends on the template's parameters"
        sum(t.float().square().mean() for t in tensors).backward()  # type: ignore[union-attr]
        assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params)

    def test_is_deterministic(self) -> None:
        model = self.make_template()
        first = _tensors(run_template(model, self.example_inputs[0]))
        second = _tensors(run_template(model, self.example_inputs[0]))
        assert len(first) == len(second)
        for a, b in zip(first, second):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    def _runtime(self) -> Runtime:
        runtime = Runtime(env={}, load_entrypoints=False)
        runtime.register(importlib.import_module(self.plugin_module))
        return runtime

    def test_registered_by_the_entry_module(self) -> None:
        if not self.plugin_module:
            pytest.skip("plugin_module not set")
        spec = self._runtime().hooks.templates().get(self.registered_name)
        assert spec.factory() is self.template_class

    def test_data_only_export_round_trip(self, tmp_path: Path) -> None:
        if not self.plugin_module:
            pytest.skip("plugin_module not set")
        runtime = self._runtime()
        model = self.make_template()
        folder = export_template(model, tmp_path / "exported", name=self.registered_name,
                                 config=self.config or None, runtime=runtime)  # fmt: skip
        assert not (folder / "model.py").exists()
        loaded = load_template(folder, runtime=runtime)
        expected, got = model.state_dict(), loaded.model.state_dict()
        assert set(expected) == set(got)
        for key, tensor in expected.items():
            assert torch.equal(tensor, got[key]), f"{key} changed in the round trip"
        for a, b in zip(_tensors(run_template(model, self.example_inputs[0])),
                        _tensors(run_template(loaded.model, self.example_inputs[0]))):  # fmt: skip
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # same weights; BLAS may differ in alignment
