"""The unit runner of a pipeline: which units it has, in which order, and running one on the call's state.

A unit declares what it needs (components, inputs) and what it writes (outputs); :meth:`UnitRunner.run_unit`
checks the declarations, onloads the unit's components, and runs ``per_branch`` units once per CFG branch.
:class:`~diffstudio.pipeline.base.BasePipeline` inherits this (through
:class:`~diffstudio.pipeline.sampling.SamplingLoop`); the sampling loop calls it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from diffstudio.errors import MissingPluginError, PipelineInputError, UnitGraphError
from diffstudio.pipeline.state import PipelineState
from diffstudio.pipeline.units import Branch, PipelineUnit, order_units

if TYPE_CHECKING:
    from diffstudio.runtime import Runtime

__all__ = ["UnitRunner"]


class UnitRunner:
    """Assembles the pipeline's units through ``pipeline_unit`` and runs them (mixed into ``BasePipeline``)."""

    if TYPE_CHECKING:  # what the runner uses of the component container (BasePipeline)
        family: ClassVar[str]
        plugin_inputs: ClassVar[Mapping[str, str]]
        extension_inputs: ClassVar[frozenset[str]]
        runtime: Runtime
        device: str
        torch_dtype: Any
        loaded: dict[str, Any]
        _units: list[PipelineUnit] | None
        _unit_owners: dict[str, str]

        def has(self, slot: str) -> bool:
            """True when the slot holds a component."""

        def activate(self, slots: Iterable[str]) -> None:
            """Onload the components in ``slots`` and offload every other."""

        def vram_ledger(self, device: str) -> Any:
            """The budget ledger of ``device``."""

    @property
    def units(self) -> list[PipelineUnit]:
        """The ordered units of this pipeline (assembled through ``pipeline_unit`` on first use)."""
        if self._units is None:
            contributed = self.runtime.hooks.pipeline_units(self)
            self._unit_owners = {unit.name: owner for owner, unit in contributed}
            self._units = order_units([unit for _, unit in contributed])
        return self._units

    def unit_owner(self, name: str) -> str:
        """Return the plugin that contributed unit ``name``."""
        _ = self.units
        return self._unit_owners[name]

    def accepted_inputs(self) -> set[str]:
        """Names of every call argument some unit declares (positive and negative forms)."""
        names: set[str] = set()
        for unit in self.units:
            for param in unit.inputs:
                names.add(param.name)
                if param.per_branch:
                    names.add(param.key_for("negative"))
        return names

    def check_inputs(self, inputs: Mapping[str, Any], fixed: Iterable[str] = ()) -> None:
        """Reject call arguments that no unit reads; name the plugin to install for known adapter inputs."""
        accepted = self.accepted_inputs() | set(fixed)
        for key, value in inputs.items():
            if key in accepted:
                continue
            if key in type(self).plugin_inputs:
                if value is None:
                    continue
                raise MissingPluginError(f"The argument {key!r}", type(self).plugin_inputs[key])
            raise PipelineInputError(
                f"{type(self).__name__} got an unknown argument {key!r}. Accepted: {', '.join(sorted(accepted))}."
            )

    def run_unit(self, unit: PipelineUnit, state: PipelineState, cfg: bool, **extra: Any) -> None:
        """Run one unit on the shared state or on each branch, and check its declared outputs."""
        missing = [c for c in unit.components if c not in self.loaded and c not in unit.optional_components]
        if missing:
            raise UnitGraphError(
                f"unit {unit.name!r} needs the component(s) {missing}, which are not loaded; add a ModelConfig "
                f"for them to from_pretrained"
            )
        if unit.components:
            self.activate(unit.components)
        branches: tuple[Branch, ...] = ("shared",)
        if unit.per_branch:
            branches = ("positive", "negative") if cfg else ("positive",)
        for branch in branches:
            kwargs: dict[str, Any] = {}
            source = state.shared if branch == "shared" else state.view(branch)
            for param in unit.inputs:
                key = param.key_for(branch)
                if branch != "shared" and not param.per_branch:
                    value = state.shared.get(key)
                else:
                    value = source.get(key)
                if value is None and param.required:
                    raise UnitGraphError(
                        f"unit {unit.name!r} needs the input {key!r}, which no call argument or earlier unit provided"
                    )
                kwargs[param.name] = value
            result = unit.process(self, **kwargs, **extra)
            declared = {p.name for p in unit.outputs}
            undeclared = set(result) - declared
            if undeclared:
                raise UnitGraphError(f"unit {unit.name!r} wrote undeclared outputs {sorted(undeclared)}")
            not_written = [p.name for p in unit.outputs if not p.optional and p.name not in result]
            if not_written:
                raise UnitGraphError(f"unit {unit.name!r} did not write its declared outputs {not_written}")
            state.branch(branch).update(result)
