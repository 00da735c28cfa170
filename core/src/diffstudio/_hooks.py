"""The typed facade: the only way core calls hooks.

One method per hookspec, so mypy checks every call site. Registration hooks are called once and cached in
typed registries (reset when a plugin is registered or unregistered).

Every hook is called through pluggy, one implementation at a time (``pm.subset_hook_caller`` holding just that
plugin), so that a failure is attributed to the plugin that caused it: an implementation that raises anything
but a :class:`~diffstudio.errors.DiffstudioError`, or returns what its hookspec does not allow, is reported to
the ``on_failure`` callback with its plugin and hook names. The runtime's callback disables the plugin (or
raises :class:`~diffstudio.errors.PluginHookError` in strict mode) and the call goes on without it. A
``DiffstudioError`` raised by a loading or assembly hook is a deliberate message about the user's input and
propagates unchanged; raised by a registration hook it is the plugin's failure like any other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import pluggy

from diffstudio.errors import DiffstudioError, PluginError, PluginHookError
from diffstudio.registry import Registry
from diffstudio.types import (
    CommandSpec,
    EmbeddedModel,
    LoraFormat,
    MemoryBudget,
    ModelClaim,
    PipelineLike,
    PipelineSpec,
    SchedulerSpec,
    TemplateSpec,
    VramStrategy,
)

if TYPE_CHECKING:
    from diffstudio.config import ModelConfig
    from diffstudio.loading.checkpoint import Checkpoint
    from diffstudio.loading.convert import Converter
    from diffstudio.pipeline.units import PipelineUnit

T = TypeVar("T")

FailureHandler = Callable[[str, str, str, "BaseException | None"], None]
"""``on_failure(plugin_name, hook_name, what, exception)``; ``what`` is one line ("its load_model hook raised ...")."""

_NOT_MINE = object()


def _raise_failure(plugin: str, hook: str, what: str, exc: BaseException | None) -> None:
    raise PluginHookError(f"plugin {plugin!r}: {what}", plugin=plugin, hook=hook) from exc


def describe_exception(exc: BaseException) -> str:
    """One line for an exception: ``"RuntimeError: boom"`` (first line of the message, at most 300 characters)."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > 300:
        first = first[:297] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _short_repr(value: object) -> str:
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a plugin's object may not even repr
        text = f"<{type(value).__name__} object>"
    return text if len(text) <= 80 else text[:77] + "..."


def _is_wrapper(impl: pluggy.HookImpl) -> bool:
    return bool(impl.hookwrapper or impl.wrapper)


class Hooks:
    """Typed access to the hooks of one plugin manager.

    Args:
        pm: The plugin manager.
        on_failure: Called when an implementation fails (see the module docstring); the default raises
            :class:`~diffstudio.errors.PluginHookError`.
    """

    def __init__(self, pm: pluggy.PluginManager, on_failure: FailureHandler | None = None) -> None:
        self._pm = pm
        self._on_failure: FailureHandler = on_failure or _raise_failure
        self._registries: dict[str, Registry[Any]] = {}
        self.failures: list[tuple[str, str, str]] = []
        """``(plugin, hook, reason)`` for every failed implementation call, in order."""

    def invalidate(self) -> None:
        """Forget cached registries (after plugins changed)."""
        self._registries.clear()

    # -- calling one implementation -----------------------------------------------------------------------------

    def _impls(self, hook_name: str, *, call_order: bool = True) -> list[pluggy.HookImpl]:
        """The hook's non-wrapper implementations, in pluggy's call order (or in registration order)."""
        caller: pluggy.HookCaller = getattr(self._pm.hook, hook_name)
        impls = [impl for impl in caller.get_hookimpls() if not _is_wrapper(impl)]
        return list(reversed(impls)) if call_order else impls

    def _fail(self, impl: pluggy.HookImpl, hook_name: str, reason: str, exc: BaseException | None = None) -> None:
        self.failures.append((impl.plugin_name, hook_name, reason))
        self._on_failure(impl.plugin_name, hook_name, f"its {hook_name} hook {reason}", exc)

    def _call_impl(
        self, hook_name: str, impl: pluggy.HookImpl, kwargs: dict[str, Any], *, typed_errors_propagate: bool
    ) -> Any:
        """Call one implementation through pluggy; return its result (None for *not mine*) or ``_NOT_MINE``.

        ``_NOT_MINE`` means the implementation failed and was reported.
        """
        others = [other.plugin for other in self._impls(hook_name) if other is not impl]
        caller = self._pm.subset_hook_caller(hook_name, remove_plugins=others)
        try:
            result = caller(**kwargs)
        except DiffstudioError as exc:
            if typed_errors_propagate:
                raise
            self._fail(impl, hook_name, f"raised {describe_exception(exc)}", exc)
            return _NOT_MINE
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - a plugin's bug must not take the host down
            self._fail(impl, hook_name, f"raised {describe_exception(exc)}", exc)
            return _NOT_MINE
        if caller.spec is not None and caller.spec.opts.get("firstresult"):
            return result
        return result[0] if result else None

    def _valid_results(
        self, hook_name: str, check: Callable[[Any], str | None], kwargs: dict[str, Any]
    ) -> Iterator[tuple[str, Any]]:
        """Call the implementations one at a time, lazily; yield ``(plugin_name, result)`` for valid non-None results.

        ``check(result)`` returns None when the result is acceptable, else what is wrong with it (the plugin is
        then reported as failed and its result dropped). Implementations run in pluggy's order.
        """
        for impl in self._impls(hook_name):
            result = self._call_impl(hook_name, impl, kwargs, typed_errors_propagate=True)
            if result is _NOT_MINE or result is None:
                continue
            problem = check(result)
            if problem is not None:
                self._fail(impl, hook_name, problem)
                continue
            yield impl.plugin_name, result

    def _call_each(self, hook_name: str, check: Callable[[Any], str | None], **kwargs: Any) -> list[tuple[str, Any]]:
        """Every valid non-None result of a collected hook (see :meth:`_valid_results`).

        Callers that must not depend on the implementations' order sort or check the results.
        """
        return list(self._valid_results(hook_name, check, kwargs))

    def _first_result(self, hook_name: str, check: Callable[[Any], str | None], **kwargs: Any) -> Any:
        """A firstresult hook's first valid non-None answer; later implementations are not called."""
        return next((result for _, result in self._valid_results(hook_name, check, kwargs)), None)

    # -- registration -------------------------------------------------------------------------------------------

    def _registry(
        self,
        hook_name: str,
        kind: str,
        key: Callable[[T], str],
        item_type: type[Any],
        check: Callable[[T], str | None] | None = None,
    ) -> Registry[T]:
        cached = self._registries.get(hook_name)
        if cached is not None:
            return cached
        registry: Registry[T] = Registry(kind, key)
        # Registration order: builtins first, so a later plugin that reuses a name is the one reported.
        for impl in self._impls(hook_name, call_order=False):
            items: list[T] = []

            def register(item: T, _items: list[T] = items) -> None:
                if not isinstance(item, item_type):
                    raise TypeError(f"register() got {_short_repr(item)}, expected a {item_type.__name__}")
                name = key(item)
                if not isinstance(name, str) or not name.strip():
                    raise TypeError(f"register() got a {item_type.__name__} whose name is {name!r}")
                problem = check(item) if check is not None else None
                if problem is not None:
                    raise TypeError(f"register() got the {kind} {name!r}, which {problem}")
                _items.append(item)

            returned = self._call_impl(hook_name, impl, {"register": register}, typed_errors_propagate=False)
            if returned is _NOT_MINE:
                continue
            if returned is not None:
                self._fail(impl, hook_name, f"returned {_short_repr(returned)}; it must call register(...) instead")
                continue
            try:
                registry.register_all(items, impl.plugin_name)
            except DiffstudioError as exc:
                self._fail(impl, hook_name, f"failed: {exc}", exc)
        self._registries[hook_name] = registry
        return registry

    def pipelines(self) -> Registry[PipelineSpec]:
        """Registered pipelines by name."""
        return self._registry("register_pipelines", "pipeline", lambda s: s.name, PipelineSpec)

    def embedded_models(self) -> Registry[EmbeddedModel]:
        """Registered embedded models by model_id."""
        return self._registry("register_embedded_models", "embedded model", lambda s: s.model_id, EmbeddedModel)

    def schedulers(self) -> Registry[SchedulerSpec]:
        """Registered schedulers by name."""
        return self._registry("register_schedulers", "scheduler", lambda s: s.name, SchedulerSpec)

    def lora_formats(self) -> Registry[LoraFormat]:
        """Registered LoRA layouts by name."""
        return self._registry("register_lora_formats", "LoRA format", lambda s: s.name, LoraFormat)

    def converters(self) -> Registry[Converter]:
        """Registered state-dict converters by name."""
        from diffstudio.loading.convert import Converter

        return self._registry("register_converters", "converter", lambda s: s.name, Converter)

    def commands(self) -> Registry[CommandSpec]:
        """Registered CLI sub-commands by name."""
        return self._registry("register_commands", "command", lambda s: s.name, CommandSpec, _check_command)

    def templates(self) -> Registry[TemplateSpec]:
        """Registered template classes by name."""
        return self._registry("register_templates", "template", lambda s: s.name, TemplateSpec)

    # -- loading ------------------------------------------------------------------------------------------------

    def load_model(self, checkpoint: Checkpoint, config: ModelConfig) -> list[ModelClaim]:
        """Ask every plugin to claim ``checkpoint``; return the claims, each stamped with its plugin name."""
        results = self._call_each(
            "load_model", _expect(ModelClaim, "a ModelClaim or None"), checkpoint=checkpoint, config=config
        )
        return [dataclasses.replace(result, plugin=plugin) for plugin, result in results]

    def families_asked(self) -> list[str]:
        """Return the names of the plugins that implement ``load_model`` (failed ones marked as such)."""
        asked = [impl.plugin_name for impl in self._impls("load_model")]
        failed = {plugin for plugin, hook, _ in self.failures if hook == "load_model"}
        return sorted(asked) + sorted(f"{name} (failed, see `diffstudio plugins`)" for name in failed - set(asked))

    # -- assembly -----------------------------------------------------------------------------------------------

    def pipeline_units(self, pipeline: PipelineLike) -> list[tuple[str, PipelineUnit]]:
        """Collect ``(plugin_name, unit)`` for every unit contributed to ``pipeline``."""
        units: list[tuple[str, PipelineUnit]] = []
        for plugin, result in self._call_each("pipeline_unit", _check_units, pipeline=pipeline):
            for unit in result:
                units.append((plugin, unit))
        return units

    def template_cache_merge(self, key: str, values: Sequence[Any], pipeline: PipelineLike) -> Any:
        """Merge several templates' values for one pipeline input (first non-None answer wins)."""
        return self._first_result("template_cache_merge", _accept, key=key, values=list(values), pipeline=pipeline)

    def vram_policy(self, model: Any, component: str, budget: MemoryBudget, pipeline: PipelineLike) -> VramStrategy:
        """Return the memory strategy for one model (core's builtin always answers)."""
        strategy = self._first_result(
            "vram_policy", _expect(VramStrategy, "a VramStrategy or None"),
            model=model, component=component, budget=budget, pipeline=pipeline,
        )  # fmt: skip
        if strategy is None:
            raise PluginError(
                f"No plugin chose a memory strategy for the {component!r} model (core's fallback is missing?); "
                f"see `diffstudio plugins`."
            )
        assert isinstance(strategy, VramStrategy)
        return strategy


# -- result checks (None: acceptable; a string: what is wrong) ------------------------------------------------------


def _accept(result: Any) -> str | None:
    return None


def _expect(expected: type[Any], wanted: str) -> Callable[[Any], str | None]:
    def check(result: Any) -> str | None:
        return None if isinstance(result, expected) else f"returned {_short_repr(result)}, expected {wanted}"

    return check


def _check_units(result: Any) -> str | None:
    from diffstudio.errors import UnitGraphError
    from diffstudio.pipeline.units import PipelineUnit, check_unit_declaration

    if isinstance(result, (str, bytes)) or not isinstance(result, Sequence):
        return f"returned {_short_repr(result)}, expected a list of PipelineUnit instances or None"
    for unit in result:
        if not isinstance(unit, PipelineUnit):
            return f"returned {_short_repr(unit)} in its list, expected PipelineUnit instances"
        try:
            check_unit_declaration(unit)
        except UnitGraphError as exc:
            return f"returned a unit with an incomplete declaration: {exc}"
    return None


def _check_command(spec: CommandSpec) -> str | None:
    name = spec.name
    if name.startswith("-") or any(c.isspace() for c in name):
        return "is not a valid command name (no leading '-', no spaces)"
    fields: dict[str, object] = {"help": spec.help, "add_arguments": spec.add_arguments, "run": spec.run}
    if not isinstance(fields["help"], str):
        return f"has a help of type {type(fields['help']).__name__}, expected str"
    if not callable(fields["add_arguments"]) or not callable(fields["run"]):
        return "has an add_arguments or run that is not callable"
    return None
