"""pytest plugin (``pytest11`` entry point): fixtures for testing diffstudio plugins.

Fixtures:
    diffstudio_runtime: a fresh :class:`diffstudio.Runtime` per test with builtins only (no entry points).
    register_plugin: ``register_plugin(obj, name=None)`` registers a plugin into that runtime and always
        unregisters it when the test ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from diffstudio.runtime import Runtime


@pytest.fixture
def diffstudio_runtime() -> Runtime:
    """A fresh runtime with core's builtin plugins only."""
    return Runtime(env={}, load_entrypoints=False)


@pytest.fixture
def register_plugin(diffstudio_runtime: Runtime) -> Iterator[Callable[..., str]]:
    """Register plugins into ``diffstudio_runtime`` for one test; they are unregistered afterwards."""
    names: list[str] = []

    def register(plugin: object, name: str | None = None) -> str:
        registered = diffstudio_runtime.register(plugin, name=name)
        names.append(registered)
        return registered

    yield register
    for name in reversed(names):
        if diffstudio_runtime.pm.get_plugin(name) is not None:
            diffstudio_runtime.unregister(name)
