"""Fuzz suites: hypothesis profiles (``ci`` by default, ``long`` with ``DIFFSTUDIO_FUZZ=long``) and the tallies."""

from __future__ import annotations

import os
from pathlib import Path

from diffstudio.testing import import_file
from hypothesis import HealthCheck, settings

harness = import_file(Path(__file__).resolve().parent / "harness.py")

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("DIFFSTUDIO_FUZZ_EXAMPLES", "300")),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile(
    "long",
    max_examples=int(os.environ.get("DIFFSTUDIO_FUZZ_EXAMPLES", "20000")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.load_profile("long" if harness.LONG else "ci")


def pytest_sessionfinish(session: object, exitstatus: int) -> None:
    for item in harness.all_tallies():
        item.write()

