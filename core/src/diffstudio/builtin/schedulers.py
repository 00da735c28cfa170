"""Core's flow-matching schedules, registered like any plugin's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from diffstudio._markers import hookimpl
from diffstudio.types import SchedulerSpec


def _factory(shift_mode: str) -> Callable[..., Any]:
    def make(**kwargs: Any) -> Any:
        from diffstudio.scheduler import FlowMatchScheduler

        return FlowMatchScheduler(shift_mode=shift_mode, **kwargs)  # type: ignore[arg-type]

    return make


@hookimpl
def register_schedulers(register: Callable[[SchedulerSpec], None]) -> None:
    """Register the FLUX.1, FLUX.2 and static-shift flow-matching schedules."""
    register(SchedulerSpec("flux1", _factory("flux1"), "flow matching, shift linear in sequence length"))
    register(SchedulerSpec("flux2", _factory("flux2"), "flow matching, empirical mu (length and step count)"))
    register(SchedulerSpec("static", _factory("static"), "flow matching with a fixed shift"))
