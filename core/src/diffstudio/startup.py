"""Process start-up and shutdown costs of the ML stack, and what diffstudio does about them.

A script that renders one image spends most of its life importing torch and transformers and tearing them down.
Two of those costs come from CPython's cyclic garbage collector, not from the work itself:

* **During imports.** Importing transformers' modelling code (``Qwen3Model`` and its dependencies) allocates a
  few hundred thousand long-lived objects, which trigger full collections that walk every object already alive.
  On the 2-core benchmark machine that is 0.7 s of a 3.4 s import (six full collections, 208 objects freed).
* **At exit.** The interpreter collects once more while finalising, walking the same graph again: 0.5 s after
  ``import torch`` alone, about 1 s with transformers loaded.

:func:`imports_without_gc` wraps the heavy imports diffstudio does lazily (text encoders, tokenizers): the
collector is paused for the block and, when it imported something, the objects alive afterwards are moved to the
permanent generation (:func:`gc.freeze`), so later collections skip them. :func:`freeze_gc_at_exit` (called
when :mod:`diffstudio` is imported) freezes the heap in the last exit handler, so the finalising collection has
almost nothing to walk.

The trade-off is CPython's documented one for :func:`gc.freeze`: cyclic garbage that exists at the moment of the
freeze is never reclaimed (at exit, it is reclaimed by the OS). Set ``DIFFSTUDIO_GC_FREEZE=0`` to keep the
collector's default behaviour; the pause during imports then still applies, without the freeze.
"""

from __future__ import annotations

import atexit
import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from diffstudio._env import switch_on

__all__ = ["freeze_gc_at_exit", "gc_freeze_enabled", "imports_without_gc"]

_ENV_SWITCH = "DIFFSTUDIO_GC_FREEZE"
_exit_handler_registered = False


def gc_freeze_enabled() -> bool:
    """Whether diffstudio may call :func:`gc.freeze` (``DIFFSTUDIO_GC_FREEZE`` unset, or not ``0``/``false``)."""
    return switch_on(_ENV_SWITCH)


@contextmanager
def imports_without_gc() -> Iterator[None]:
    """Pause the cyclic collector for a block of heavy imports, then freeze what they created.

    The freeze happens only when the block imported a module: loading a second text encoder in the same process
    pauses the collector but pins nothing more.

    The collector's previous state (enabled or not) is restored on exit, also when the block raises.
    """
    was_enabled = gc.isenabled()
    modules_before = len(sys.modules)
    gc.disable()
    try:
        yield
    finally:
        if gc_freeze_enabled() and len(sys.modules) > modules_before:
            gc.freeze()
        if was_enabled:
            gc.enable()


def _freeze_for_exit() -> None:
    if gc_freeze_enabled():
        gc.freeze()


def freeze_gc_at_exit() -> None:
    """Register (once per process) an exit handler that freezes the heap before the interpreter finalises.

    :mod:`atexit` runs handlers last-registered first, so this one, registered when :mod:`diffstudio` is first
    imported, runs after the handlers of everything imported later (accelerate, tqdm, user code).
    """
    global _exit_handler_registered
    if not _exit_handler_registered:
        atexit.register(_freeze_for_exit)
        _exit_handler_registered = True
