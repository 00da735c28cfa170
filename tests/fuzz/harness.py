"""Fuzzing harness: run one case, classify its outcome, tally the outcomes of a suite.

Every fuzz test feeds one generated input to the code under test through :func:`check`, together with an oracle's
verdict (``should_fail``: the input is invalid and must be refused; ``False``: it is valid and must be accepted;
``None``: either is acceptable as long as a refusal is typed). The outcome is one of

- ``ok``: valid input accepted, or (``should_fail is None``) accepted;
- ``typed``: refused with a :class:`diffstudio.errors.DiffstudioError` (the project's error class);
- ``untyped``: any other exception escaped (``RecursionError``, a bare ``ValueError``, a torch ``RuntimeError``...);
- ``silent``: invalid input accepted without a word;
- ``wrong``: valid input refused (reported with the untyped ones: a refusal the oracle did not expect);
- ``hang``: the case took longer than its time budget.

A crash (the process dies: SIGBUS, a segfault) cannot be counted from inside; the suite then fails as a whole and
``make fuzz`` reports it from the exit status.

Tallies are written as JSON to ``build/fuzz/<suite>.json`` when the session ends, and ``make fuzz`` prints them.
The number of cases comes from the hypothesis profile: ``ci`` (the default, a few hundred per suite) or ``long``
(``DIFFSTUDIO_FUZZ=long``).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffstudio.errors import DiffstudioError

OUTCOMES = ("ok", "typed", "untyped", "silent", "wrong", "hang")
FAILING = ("untyped", "silent", "wrong", "hang")
LONG = os.environ.get("DIFFSTUDIO_FUZZ", "").strip().lower() == "long"
REPORT_DIR = Path(__file__).resolve().parents[2] / "build" / "fuzz"


@dataclass
class Tally:
    """Outcome counts of one fuzz suite, with one example input kept for each failing outcome."""

    suite: str
    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, outcome: str, example: str) -> None:
        """Count one case; keep the first example of every failing outcome."""
        self.counts[outcome] += 1
        if outcome in FAILING and outcome not in self.examples:
            self.examples[outcome] = example[:500]

    def to_json(self) -> dict[str, Any]:
        """``{"suite", "cases", <outcome>: n..., "examples"}``."""
        data: dict[str, Any] = {"suite": self.suite, "cases": sum(self.counts.values())}
        data.update({name: self.counts.get(name, 0) for name in OUTCOMES})
        data["examples"] = self.examples
        return data

    def write(self) -> Path:
        """Write the tally to ``build/fuzz/<suite>.json`` atomically; return the path."""
        REPORT_DIR.mkdir(parents=True, exist_ok=True)
        path = REPORT_DIR / f"{self.suite}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2))
        os.replace(tmp, path)
        return path


_TALLIES: dict[str, Tally] = {}


def tally(suite: str) -> Tally:
    """The session's tally for ``suite`` (created on first use)."""
    if suite not in _TALLIES:
        _TALLIES[suite] = Tally(suite)
    return _TALLIES[suite]


def all_tallies() -> list[Tally]:
    """Every tally of this session."""
    return list(_TALLIES.values())


def classify(
    call: Callable[[], object],
    *,
    should_fail: bool | None,
    budget_s: float = 5.0,
) -> tuple[str, BaseException | None]:
    """Run ``call`` once and classify it (see the module docstring); return ``(outcome, exception or None)``."""
    start = time.perf_counter()
    error: BaseException | None = None
    try:
        call()
    except DiffstudioError as exc:
        error = exc
        outcome = "typed" if should_fail is not False else "wrong"
    except (Exception, RecursionError, MemoryError) as exc:  # noqa: B014 - named for the reader
        error = exc
        outcome = "untyped"
    else:
        outcome = "silent" if should_fail else "ok"
    if time.perf_counter() - start > budget_s:
        outcome = "hang"
    return outcome, error


def check(
    suite: str,
    call: Callable[[], object],
    *,
    should_fail: bool | None,
    example: object,
    budget_s: float = 5.0,
) -> str:
    """Classify one case, count it in ``suite``'s tally and assert it is not a failing outcome.

    Returns the outcome. The assertion message names the outcome, the input (``repr(example)``, shortened) and the
    escaped exception, so that hypothesis shrinks to and prints a minimal failing input.
    """
    outcome, error = classify(call, should_fail=should_fail, budget_s=budget_s)
    shown = repr(example)
    tally(suite).add(outcome, shown)
    what = type(error).__name__ if error else "accepted"
    assert outcome not in FAILING, f"{outcome}: {what}: {error} <- {shown[:300]}"
    return outcome
