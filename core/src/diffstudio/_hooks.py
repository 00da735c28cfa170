"""The typed facade: the only way core calls hooks.

One method per hookspec, so mypy checks every call site. Registration hooks are called once and cached in
typed registries (reset when a plugin is registered or unregistered).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import pluggy

from diffstudio.registry import Registry
from diffstudio.types import (
    CommandSpec,
    EmbeddedModel,
    LoraFormat,
    MemoryBudget,
    ModelClaim,
    PipelineSpec,
    SchedulerSpec,
    TemplateSpec,
    VramStrategy,
)

if TYPE_CHECKING:
    from diffstudio.config import ModelConfig
    from diffstudio.loading.checkpoint import Checkpoint
    from diffstudio.loading.convert import Converter
    from diffstudio.pipeline.base import BasePipeline
    from diffstudio.pipeline.units import PipelineUnit

T = TypeVar("T")


class Hooks:
    """Typed access to the hooks of one plugin manager."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._pm = pm
        self._registries: dict[str, Registry[Any]] = {}

    def invalidate(self) -> None:
        """Forget cached registries (after plugins changed)."""
        self._registries.clear()

    def _call_each(self, hook_name: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call every implementation of a collected hook, returning ``(plugin_name, result)`` pairs.

        Implementations run in pluggy's order; callers that must not depend on order sort or check results.
        """
        caller: pluggy.HookCaller = getattr(self._pm.hook, hook_name)
        results: list[tuple[str, Any]] = []
        for impl in reversed(caller.get_hookimpls()):
            args = [kwargs[name] for name in impl.argnames]
            results.append((impl.plugin_name, impl.function(*args)))
        return results

    def _registry(self, hook_name: str, kind: str, key: Callable[[T], str]) -> Registry[T]:
        cached = self._registries.get(hook_name)
        if cached is not None:
            return cached
        registry: Registry[T] = Registry(kind, key)
        caller: pluggy.HookCaller = getattr(self._pm.hook, hook_name)
        for impl in reversed(caller.get_hookimpls()):
            owner = impl.plugin_name

            def register(item: T, _owner: str = owner) -> None:
                registry.register(item, _owner)

            impl.function(*[register for _ in impl.argnames])
        self._registries[hook_name] = registry
        return registry

    # -- registration -------------------------------------------------------------------------------------------

    def pipelines(self) -> Registry[PipelineSpec]:
        """Registered pipelines by name."""
        return self._registry("register_pipelines", "pipeline", lambda s: s.name)

    def embedded_models(self) -> Registry[EmbeddedModel]:
        """Registered embedded models by model_id."""
        return self._registry("register_embedded_models", "embedded model", lambda s: s.model_id)

    def schedulers(self) -> Registry[SchedulerSpec]:
        """Registered schedulers by name."""
        return self._registry("register_schedulers", "scheduler", lambda s: s.name)

    def lora_formats(self) -> Registry[LoraFormat]:
        """Registered LoRA layouts by name."""
        return self._registry("register_lora_formats", "LoRA format", lambda s: s.name)

    def converters(self) -> Registry[Converter]:
        """Registered state-dict converters by name."""
        return self._registry("register_converters", "converter", lambda s: s.name)

    def commands(self) -> Registry[CommandSpec]:
        """Registered CLI sub-commands by name."""
        return self._registry("register_commands", "command", lambda s: s.name)

    def templates(self) -> Registry[TemplateSpec]:
        """Registered template classes by name."""
        return self._registry("register_templates", "template", lambda s: s.name)

    # -- loading ------------------------------------------------------------------------------------------------

    def load_model(self, checkpoint: Checkpoint, config: ModelConfig) -> list[ModelClaim]:
        """Ask every plugin to claim ``checkpoint``; return the claims, each stamped with its plugin name."""
        claims: list[ModelClaim] = []
        for plugin, result in self._call_each("load_model", checkpoint=checkpoint, config=config):
            if result is not None:
                claims.append(dataclasses.replace(result, plugin=plugin))
        return claims

    def families_asked(self) -> list[str]:
        """Return the names of the plugins that implement ``load_model``."""
        return sorted(impl.plugin_name for impl in self._pm.hook.load_model.get_hookimpls())

    # -- assembly -----------------------------------------------------------------------------------------------

    def pipeline_units(self, pipeline: BasePipeline) -> list[tuple[str, PipelineUnit]]:
        """Collect ``(plugin_name, unit)`` for every unit contributed to ``pipeline``."""
        units: list[tuple[str, PipelineUnit]] = []
        for plugin, result in self._call_each("pipeline_unit", pipeline=pipeline):
            for unit in result or ():
                units.append((plugin, unit))
        return units

    def template_cache_merge(self, key: str, values: Sequence[Any], pipeline: BasePipeline) -> Any:
        """Merge several templates' values for one pipeline input (first non-None answer wins)."""
        return self._pm.hook.template_cache_merge(key=key, values=list(values), pipeline=pipeline)

    def vram_policy(self, model: Any, component: str, budget: MemoryBudget, pipeline: BasePipeline) -> VramStrategy:
        """Return the memory strategy for one model (core's builtin always answers)."""
        strategy = self._pm.hook.vram_policy(model=model, component=component, budget=budget, pipeline=pipeline)
        if not isinstance(strategy, VramStrategy):
            raise TypeError(f"vram_policy returned {strategy!r}, which is not a VramStrategy")
        return strategy
