"""diffstudio.startup: the collector is paused around heavy imports and the heap is frozen before exit."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from diffstudio.startup import gc_freeze_enabled, imports_without_gc


@pytest.fixture(autouse=True)
def _restore_collector() -> Iterator[None]:
    was_enabled = gc.isenabled()
    yield
    gc.unfreeze()
    if was_enabled:
        gc.enable()
    else:
        gc.disable()


def test_collector_is_paused_inside_and_restored_after() -> None:
    gc.enable()
    with imports_without_gc():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_disabled_collector_stays_disabled() -> None:
    gc.disable()
    with imports_without_gc():
        pass
    assert not gc.isenabled()


def test_collector_is_restored_when_the_block_raises() -> None:
    gc.enable()
    with pytest.raises(ImportError), imports_without_gc():
        import diffstudio_no_such_module  # type: ignore[import-not-found]  # noqa: F401
    assert gc.isenabled()


def test_objects_alive_after_the_block_are_frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DIFFSTUDIO_GC_FREEZE", raising=False)
    gc.unfreeze()
    with imports_without_gc():
        kept = [[i] for i in range(1000)]
    assert gc.get_freeze_count() == 0, "nothing was imported: nothing is pinned"
    sys.modules.pop("colorsys", None)
    with imports_without_gc():
        import colorsys  # noqa: F401
    assert gc.get_freeze_count() >= len(kept)


@pytest.mark.parametrize("value", ["0", "false", "OFF", " no "])
def test_the_environment_switch_turns_the_freeze_off(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("DIFFSTUDIO_GC_FREEZE", value)
    assert not gc_freeze_enabled()
    gc.unfreeze()
    with imports_without_gc():
        pass
    assert gc.get_freeze_count() == 0


def _freeze_count_seen_by_a_later_exit_handler(env: dict[str, str]) -> int:
    # atexit runs handlers last-registered first: one registered before importing diffstudio runs after its own.
    script = (
        "import atexit, gc\n"
        "atexit.register(lambda: print(gc.get_freeze_count()))\n"
        "import diffstudio\n"
        "junk = [[i] for i in range(1000)]\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    return int(result.stdout.strip())


def test_the_heap_is_frozen_before_the_interpreter_finalises() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DIFFSTUDIO_GC_FREEZE"}
    assert _freeze_count_seen_by_a_later_exit_handler(env) >= 1000
    assert _freeze_count_seen_by_a_later_exit_handler({**env, "DIFFSTUDIO_GC_FREEZE": "0"}) == 0
