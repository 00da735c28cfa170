"""diffstudio.testing.import_file: one module object per file, registered before it runs, errors that say why."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from diffstudio.testing import import_file, module_name


def test_a_file_is_imported_once_and_shared(tmp_path: Path) -> None:
    helper = tmp_path / "fixtures-text.py"
    helper.write_text("import sys\nRUNS = [__name__ in sys.modules]\n", encoding="utf-8")
    first = import_file(helper)
    again = import_file(tmp_path / "." / "fixtures-text.py")
    assert first is again
    assert first.RUNS == [True]  # registered before its body ran (dataclasses, pickling)
    assert first.__name__ == module_name(helper) and first.__name__.isidentifier()
    assert module_name(tmp_path / "other" / "fixtures-text.py") != first.__name__


def test_a_failing_file_is_not_left_half_imported(tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n", encoding="utf-8")
    with pytest.raises(RuntimeError, match="boom"):
        import_file(broken)
    assert module_name(broken) not in sys.modules
    with pytest.raises(FileNotFoundError, match="no Python file"):
        import_file(tmp_path / "missing.py")
