"""Helpers for the tests and benchmarks of diffstudio and its plugins.

Tests live next to the package they test (``plugins/<name>/tests``), in folders that are not packages, so a test
module, a benchmark or another package's test cannot import their helper modules (``fixtures_text.py``,
``conftest.py``...) by name. :func:`import_file` loads one by path, once per process.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType


def module_name(path: str | os.PathLike[str]) -> str:
    """The ``sys.modules`` key :func:`import_file` uses for ``path``: its stem plus a digest of the full path."""
    resolved = Path(path).resolve()
    digest = hashlib.sha1(str(resolved).encode("utf-8"), usedforsecurity=False).hexdigest()[:10]
    stem = re.sub(r"\W", "_", resolved.stem)
    return f"_diffstudio_file_{stem}_{digest}"


def import_file(path: str | os.PathLike[str]) -> ModuleType:
    """Import the Python file at ``path`` (once per process) and return the module.

    The module is registered in ``sys.modules`` under :func:`module_name` before it runs, so dataclasses and
    pickling inside it work, and every caller, whichever test or benchmark, gets the same module object.

    Raises:
        FileNotFoundError: ``path`` is not a file.
    """
    file = Path(path).resolve()
    name = module_name(file)
    loaded = sys.modules.get(name)
    if loaded is not None:
        return loaded
    if not file.is_file():
        raise FileNotFoundError(f"no Python file at {file}")
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:  # pragma: no cover - a .py file always has a source loader
        raise ImportError(f"cannot import {file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
