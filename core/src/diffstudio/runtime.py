"""The runtime: owns one plugin manager, loads plugins tolerantly and exposes the typed hook facade.

There is no module-level manager. Every :class:`Runtime` builds its own, in this order: add the hookspecs,
register core's builtin plugins (through the same path as external ones), load the ``diffstudio`` entry-point
group (skipping and reporting plugins that fail), register modules named in ``DIFFSTUDIO_PLUGINS``, then check
that every implementation matches a spec.

Environment variables:
    DIFFSTUDIO_STRICT_PLUGINS=1: a plugin that fails to load is fatal (``PluginLoadError``), and so is a hook
        implementation that raises or returns what its hookspec forbids (``PluginHookError``). Without it such
        a plugin is disabled for the rest of the runtime with a one-line warning naming it and the hook, shown
        as failed by ``diffstudio plugins``, and the host goes on without it.
    DIFFSTUDIO_LOAD_PLUGINS=a,b: allow-list of entry-point names (empty: load none).
    DIFFSTUDIO_DISABLED_PLUGINS=x,y: block-list (entry-point or distribution names; builtins marked
        essential cannot be blocked).
    DIFFSTUDIO_DISABLE_PLUGIN_AUTOLOAD=1: do not read entry points at all.
    DIFFSTUDIO_PLUGINS=pkg.module,...: extra modules to register as plugins (tests, local experiments).
    DIFFSTUDIO_TRACE_HOOKS=1: print every hook call (hook, plugin, argument names) and its result to stderr.

A plugin fails to load when its module raises while importing (``SystemExit`` included), declares an
incompatible diffstudio-core / template SDK requirement (checked before importing it), has a hook
implementation whose arguments do not match the hookspec, or implements a hook no spec declares (a misspelt
name). Every such plugin is skipped and reported; none of them stops another from loading.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata as metadata
import os
import sys
from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import Any

import pluggy
from packaging.requirements import InvalidRequirement, Requirement

from diffstudio import hookspecs
from diffstudio._hooks import Hooks, describe_exception
from diffstudio._markers import ENTRY_POINT_GROUP, PROJECT_NAME
from diffstudio._version import __version__
from diffstudio.errors import DuplicateRegistrationError, PluginHookError, PluginLoadError
from diffstudio.types import PluginStatus

#: Core's own plugins: (module, essential). Essential ones cannot be blocked.
BUILTIN_PLUGINS: tuple[tuple[str, bool], ...] = (
    ("diffstudio.builtin.fallbacks", True),
    ("diffstudio.builtin.vram", True),
    ("diffstudio.builtin.schedulers", False),
    ("diffstudio.builtin.commands", True),
    ("diffstudio.builtin.inspect_command", False),
    ("diffstudio.builtin.catalog", False),
    ("diffstudio.builtin.template_commands", False),
    ("diffstudio.builtin.convert_command", False),
    ("diffstudio.cache.plugin", False),
)

#: Distributions whose versions a plugin may constrain; checked before the plugin is imported.
_CHECKED_REQUIREMENTS = ("diffstudio-core", "diffstudio-template-sdk")


def _csv_env(env: Mapping[str, str], name: str) -> list[str] | None:
    raw = env.get(name)
    if raw is None:
        return None
    return [item.strip() for item in raw.split(",") if item.strip()]


def _truthy(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _installed_version(dist_name: str) -> str | None:
    try:
        return metadata.version(dist_name)
    except metadata.PackageNotFoundError:
        return None


def incompatible_requirements(dist: metadata.Distribution) -> list[str]:
    """Return readable reasons why ``dist`` cannot run against the installed core / template SDK."""
    problems: list[str] = []
    for raw in dist.requires or ():
        try:
            req = Requirement(raw)
        except InvalidRequirement:
            continue
        name = req.name.lower().replace("_", "-")
        if name not in _CHECKED_REQUIREMENTS:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        installed = __version__ if name == "diffstudio-core" else _installed_version(name)
        if installed is None:
            problems.append(f"needs {req} but {name} is not installed")
        elif req.specifier and not req.specifier.contains(installed, prereleases=True):
            problems.append(f"needs {req} but {name} {installed} is installed")
    return problems


def _describe(status: PluginStatus) -> str:
    """``plugin 'name' (distribution)`` for messages."""
    return f"plugin {status.name!r} ({status.distribution.strip('()')})"


def _load_failure(exc: BaseException) -> str:
    """One line for an import failure (``SystemExit`` has no useful message of its own)."""
    if isinstance(exc, SystemExit):
        return f"SystemExit({exc.code!r}) raised while importing"
    return describe_exception(exc)


class Runtime:
    """Owns a plugin manager and everything registered through it.

    Args:
        env: Environment to read the ``DIFFSTUDIO_*`` variables from (default ``os.environ``).
        plugins: Extra plugin objects or modules to register after the entry points (tests use this).
        load_entrypoints: Read the ``diffstudio`` entry-point group (default True, unless
            ``DIFFSTUDIO_DISABLE_PLUGIN_AUTOLOAD=1``).
        strict: Failures are fatal; default from ``DIFFSTUDIO_STRICT_PLUGINS``.
    """

    def __init__(
        self,
        *,
        env: Mapping[str, str] | None = None,
        plugins: Iterable[object] = (),
        load_entrypoints: bool | None = None,
        strict: bool | None = None,
    ) -> None:
        self.env: Mapping[str, str] = os.environ if env is None else env
        self.strict = _truthy(self.env, "DIFFSTUDIO_STRICT_PLUGINS") if strict is None else strict
        self.pm = pluggy.PluginManager(PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.statuses: list[PluginStatus] = []
        self.hooks = Hooks(self.pm, on_failure=self.plugin_failed)
        self._blocked = set(_csv_env(self.env, "DIFFSTUDIO_DISABLED_PLUGINS") or ())
        for name in self._blocked:
            self.pm.set_blocked(name)
        self._register_builtins()
        if load_entrypoints is None:
            load_entrypoints = not _truthy(self.env, "DIFFSTUDIO_DISABLE_PLUGIN_AUTOLOAD")
        if load_entrypoints:
            self._load_entrypoints()
        for module_name in _csv_env(self.env, "DIFFSTUDIO_PLUGINS") or ():
            self._load_module_plugin(module_name)
        for plugin in plugins:
            self.register(plugin)
        self.pm.check_pending()
        if _truthy(self.env, "DIFFSTUDIO_TRACE_HOOKS"):
            self._install_tracing()

    # ----------------------------------------------------------------------------------------------------------
    # registration
    # ----------------------------------------------------------------------------------------------------------

    def register(self, plugin: object, name: str | None = None) -> str:
        """Register a plugin object or module; returns its name. Resets cached registries."""
        try:
            registered = self.pm.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as exc:
            raise PluginLoadError(f"Plugin {name or plugin!r} cannot be registered: {exc}") from exc
        if registered is None:
            raise PluginLoadError(f"Plugin {name or plugin!r} is blocked and was not registered.")
        unknown = self._unknown_hooks(plugin)
        if unknown:
            self.pm.unregister(plugin)
            raise PluginLoadError(f"Plugin {registered!r} cannot be registered: {unknown}")
        self.hooks.invalidate()
        module = plugin.__name__ if isinstance(plugin, ModuleType) else type(plugin).__module__
        self.statuses.append(
            PluginStatus(
                name=registered,
                distribution="(registered in process)",
                version="",
                module=module,
                status="loaded",
                hooks=self._hooks_of(plugin),
            )
        )
        return registered

    def unregister(self, name: str) -> None:
        """Unregister a plugin by name (tests); resets cached registries. A plugin disabled after a failure is gone."""
        if self.pm.get_plugin(name) is not None:
            self.pm.unregister(name=name)
        self.statuses = [s for s in self.statuses if s.name != name]
        self.hooks.invalidate()

    def _hooks_of(self, plugin: object) -> list[str]:
        callers = self.pm.get_hookcallers(plugin) or []
        return sorted(caller.name for caller in callers)

    def _unknown_hooks(self, plugin: object) -> str:
        """Describe the hooks ``plugin`` implements that no hookspec declares ("" when there are none)."""
        problems: list[str] = []
        for caller in self.pm.get_hookcallers(plugin) or []:
            if caller.has_spec():
                continue
            if any(impl.plugin is plugin and not impl.optionalhook for impl in caller.get_hookimpls()):
                close = difflib.get_close_matches(caller.name, hookspecs.HOOK_NAMES, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"{caller.name!r}{hint}")
        if not problems:
            return ""
        return (
            f"it implements {', '.join(sorted(problems))}, which no diffstudio hookspec declares "
            f"(known hooks: {', '.join(hookspecs.HOOK_NAMES)})"
        )

    def _register_checked(self, plugin: object, name: str) -> None:
        """Register a third-party plugin; raise if pluggy refuses it or it implements an unknown hook."""
        self.pm.register(plugin, name=name)
        unknown = self._unknown_hooks(plugin)
        if unknown:
            self.pm.unregister(plugin)
            raise PluginLoadError(unknown)

    def _register_builtins(self) -> None:
        for module_name, essential in BUILTIN_PLUGINS:
            short = module_name.rsplit(".", 1)[-1]
            name = f"builtin.{short}"
            if not essential and (name in self._blocked or short in self._blocked):
                self.statuses.append(
                    PluginStatus(name, "diffstudio-core", __version__, module_name, "blocked", "blocked by env")
                )
                continue
            module = importlib.import_module(module_name)
            self.pm.register(module, name=name)
            self.statuses.append(
                PluginStatus(name, "diffstudio-core", __version__, module_name, "builtin", None, self._hooks_of(module))
            )

    def _status(self, name: str) -> PluginStatus:
        """The status row of plugin ``name`` (a new one when it was registered behind the runtime's back)."""
        for status in reversed(self.statuses):
            if status.name == name:
                return status
        plugin = self.pm.get_plugin(name)
        module = getattr(plugin, "__name__", type(plugin).__module__)
        status = PluginStatus(name, "(registered in process)", "", str(module), "loaded")
        self.statuses.append(status)
        return status

    def plugin_failed(self, plugin_name: str, hook_name: str, what: str, exc: BaseException | None = None) -> None:
        """A plugin failed while the host used it: disable it and warn, or raise in strict mode.

        Args:
            plugin_name: The plugin.
            hook_name: The hook it failed in (for :class:`~diffstudio.errors.PluginHookError`).
            what: One line, e.g. ``"its load_model hook raised RuntimeError: boom"``.
            exc: The exception, if any (chained in strict mode).

        Raises:
            PluginHookError: In strict mode (``DuplicateRegistrationError`` itself for a duplicate name).
        """
        status = self._status(plugin_name)
        where = _describe(status)
        what = what.rstrip(".")
        if self.strict:
            if isinstance(exc, DuplicateRegistrationError):
                raise exc  # already names both plugins
            raise PluginHookError(
                f"The {where} failed: {what} (DIFFSTUDIO_STRICT_PLUGINS=1 makes this fatal; "
                f"unset it to skip the plugin instead)",
                plugin=plugin_name,
                hook=hook_name,
            ) from exc
        status.status = "failed"
        status.error = what.removeprefix("its ")
        if self.pm.get_plugin(plugin_name) is not None:
            self.pm.unregister(name=plugin_name)
        self.hooks.invalidate()
        print(
            f"diffstudio: {where} disabled: {what}. Report it to the plugin's authors "
            f"(DIFFSTUDIO_DISABLED_PLUGINS={plugin_name} skips it quietly).",
            file=sys.stderr,
        )

    def _fail(self, status: PluginStatus, reason: str) -> None:
        status.status = "failed"
        status.error = reason
        self.statuses.append(status)
        if self.strict:
            raise PluginLoadError(
                f"The {_describe(status)} failed to load: {reason} (DIFFSTUDIO_STRICT_PLUGINS=1 makes this fatal; "
                f"unset it to skip the plugin instead)"
            )
        print(f"diffstudio: {_describe(status)} skipped: {reason}", file=sys.stderr)

    def _load_entrypoints(self) -> None:
        allow = _csv_env(self.env, "DIFFSTUDIO_LOAD_PLUGINS")
        seen: set[str] = set()
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if ep.name in seen:
                continue
            seen.add(ep.name)
            dist = ep.dist
            dist_name = str(dist.metadata["Name"] or "(unnamed)") if dist is not None else "(unknown)"
            version = str(dist.version or "") if dist is not None else ""
            status = PluginStatus(ep.name, dist_name, version, ep.value, "loaded")
            if ep.name in self._blocked or dist_name in self._blocked:
                status.status, status.error = "blocked", "DIFFSTUDIO_DISABLED_PLUGINS"
                self.statuses.append(status)
                continue
            if allow is not None and ep.name not in allow and dist_name not in allow:
                status.status, status.error = "not allowed", "not in DIFFSTUDIO_LOAD_PLUGINS"
                self.statuses.append(status)
                continue
            if dist is not None:
                problems = incompatible_requirements(dist)
                if problems:
                    self._fail(status, "; ".join(problems))
                    continue
            try:
                plugin = ep.load()
                self._register_checked(plugin, ep.name)
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - any import error of a third-party plugin is reported
                self._fail(status, _load_failure(exc))
                continue
            status.hooks = self._hooks_of(plugin)
            self.statuses.append(status)

    def _load_module_plugin(self, module_name: str) -> None:
        status = PluginStatus(module_name, "(DIFFSTUDIO_PLUGINS)", "", module_name, "loaded")
        try:
            module = importlib.import_module(module_name)
            self._register_checked(module, module_name)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - reported like an entry-point failure
            self._fail(status, _load_failure(exc))
            return
        status.hooks = self._hooks_of(module)
        self.statuses.append(status)

    def _install_tracing(self) -> None:
        def plugins(impls: Any) -> str:
            return ",".join(impl.plugin_name for impl in impls) or "-"

        def before(hook_name: str, impls: Any, kwargs: Mapping[str, Any]) -> None:
            print(f"diffstudio trace: {hook_name}[{plugins(impls)}]({', '.join(kwargs)})", file=sys.stderr)

        def after(outcome: Any, hook_name: str, impls: Any, kwargs: Mapping[str, Any]) -> None:
            if outcome.exception is not None:
                result = f"raised {describe_exception(outcome.exception)}"
            else:
                try:
                    text = repr(outcome.get_result())
                except Exception as exc:  # noqa: BLE001 - tracing must not fail the call
                    text = f"<unprintable: {describe_exception(exc)}>"
                result = text if len(text) <= 120 else text[:117] + "..."
            print(f"diffstudio trace: {hook_name}[{plugins(impls)}] -> {result}", file=sys.stderr)

        self.pm.add_hookcall_monitoring(before, after)

    # ----------------------------------------------------------------------------------------------------------
    # queries
    # ----------------------------------------------------------------------------------------------------------

    def failed(self) -> list[PluginStatus]:
        """Return the plugins that failed to load."""
        return [s for s in self.statuses if s.status == "failed"]

    def plugin_names(self) -> list[str]:
        """Return the names of every registered plugin (builtins included)."""
        return sorted(name for name, _ in self.pm.list_name_plugin())
