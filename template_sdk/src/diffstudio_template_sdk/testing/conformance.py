"""Conformance mixins that plugin test suites subclass.

Each mixin is a plain class of ``test_*`` methods; a plugin's test module subclasses it (the class name must
start with ``Test``) and sets a few attributes. The fixtures come from :mod:`.plugin`.

Example::

    class TestToyFamily(FamilyConformance):
        plugin_module = "diffstudio_template_sdk.testing.toy"
        family = "toy"

        def make_checkpoint(self, tmp_path):
            return write_toy_checkpoint(tmp_path / "toy.safetensors")
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
from diffstudio.config import ModelConfig
from diffstudio.identify import identify
from diffstudio.pipeline.units import PipelineUnit, check_unit_declaration, order_units
from diffstudio.runtime import Runtime
from diffstudio.types import MemoryBudget, VramStrategy


class FamilyConformance:
    """Checks every family plugin must pass.

    Attributes to set:
        plugin_module: Import path of the plugin's entry module.
        family: The family name its claims carry.
        foreign_checkpoints: Optional callables ``(tmp_path) -> path`` making checkpoints of other families,
            which this family must not claim.
    """

    plugin_module: ClassVar[str] = ""
    family: ClassVar[str] = ""

    def make_checkpoint(self, tmp_path: Path) -> Path | list[Path]:
        """Write a tiny checkpoint of this family; return its path(s)."""
        raise NotImplementedError("subclasses write a tiny checkpoint of their family")

    def foreign_checkpoints(self) -> list[Callable[[Path], Path]]:
        """Makers of checkpoints this family must not claim."""
        return []

    def test_entry_module_imports_no_torch(self) -> None:
        code = (
            f"import sys, importlib; importlib.import_module({self.plugin_module!r}); "
            "sys.exit(1 if 'torch' in sys.modules else 0)"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"importing {self.plugin_module} imported torch: {result.stderr}"

    def test_registers_a_pipeline(self, diffstudio_runtime: Runtime, register_plugin: Any) -> None:
        register_plugin(importlib.import_module(self.plugin_module))
        families = {spec.family for spec in diffstudio_runtime.hooks.pipelines()}
        assert self.family in families

    def test_claims_own_checkpoint(
        self, diffstudio_runtime: Runtime, register_plugin: Any, tmp_path: Path
    ) -> None:
        register_plugin(importlib.import_module(self.plugin_module))
        path = self.make_checkpoint(tmp_path)
        _, claim = identify(diffstudio_runtime, ModelConfig(path=path))  # type: ignore[arg-type]
        assert claim.family == self.family

    def test_ignores_foreign_checkpoints(
        self, diffstudio_runtime: Runtime, register_plugin: Any, tmp_path: Path
    ) -> None:
        from diffstudio.loading.checkpoint import Checkpoint

        register_plugin(importlib.import_module(self.plugin_module))
        for index, maker in enumerate(self.foreign_checkpoints()):
            path = maker(tmp_path / f"foreign{index}")
            claims = diffstudio_runtime.hooks.load_model(Checkpoint.open(path), ModelConfig(path=str(path)))
            assert not [c for c in claims if c.family == self.family], f"{self.family} claimed {path}"


class UnitConformance:
    """Checks for the units a plugin contributes.

    Attributes to set:
        units: Factories of the unit instances to check.
    """

    units: ClassVar[tuple[Callable[[], PipelineUnit], ...]] = ()

    def test_units_are_declared(self) -> None:
        for make in self.units:
            check_unit_declaration(make())

    def test_units_order_without_cycles(self) -> None:
        order_units([make() for make in self.units])

    def test_units_keep_no_state(self) -> None:
        for make in self.units:
            unit = make()
            assert not vars(unit), f"unit {unit.name!r} keeps instance state {sorted(vars(unit))}"


class VramPolicyConformance:
    """Checks for a ``vram_policy`` strategy.

    Attributes to set:
        make_strategy: ``(budget) -> VramStrategy`` building the strategy under test.
    """

    def make_strategy(self, budget: MemoryBudget) -> VramStrategy:
        """Build the strategy under test."""
        raise NotImplementedError("subclasses build their strategy")

    def make_model(self) -> Any:
        """A small model to place (override for family-specific metadata)."""
        import torch

        return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 4))

    def budget(self) -> MemoryBudget:
        """An all-CPU float32 budget."""
        import torch

        f32 = torch.float32
        return MemoryBudget("cpu", f32, "cpu", f32, "cpu", f32, "cpu", f32, None)

    def test_strategy_protocol(self) -> None:
        assert isinstance(self.make_strategy(self.budget()), VramStrategy)

    def test_outputs_unchanged_on_cpu_float32(self) -> None:
        import torch

        model = self.make_model()
        x = torch.randn(2, 8)
        expected = model(x)
        placed = self.make_strategy(self.budget()).apply(model)
        if placed is None:
            pytest.fail("apply() must return the module to use")
        torch.testing.assert_close(placed(x), expected, rtol=0, atol=0)
