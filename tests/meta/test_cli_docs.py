"""``docs/cli.md`` is generated from the parsers and must be current (issue 22's acceptance)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from diffstudio.testing import import_file

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "cli.md"


def test_cli_reference_is_current(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = import_file(ROOT / "scripts" / "gen-cli-docs.py")
    text = DOC.read_text(encoding="utf-8")
    recorded = re.search(r"\(Python (\d+\.\d+),", text)
    assert recorded is not None, f"{DOC} has no generator header; regenerate it with: {generator.REGENERATE}"
    if recorded.group(1) != generator.python_version():
        here = generator.python_version()
        pytest.skip(f"docs/cli.md records Python {recorded.group(1)}'s argparse layout; this is Python {here}")
    for name, value in (("COLUMNS", str(generator.COLUMNS)), ("NO_COLOR", "1"), ("PYTHON_COLORS", "0")):
        monkeypatch.setenv(name, value)  # render() sets these; monkeypatch puts the old values back afterwards
    assert generator.render() == text, f"docs/cli.md is not current; regenerate it with: {generator.REGENERATE}"


def test_cli_reference_lists_every_command() -> None:
    text = DOC.read_text(encoding="utf-8")
    for command in ("plugins", "run", "train", "models", "templates"):
        assert f"## `diffstudio {command}`" in text
