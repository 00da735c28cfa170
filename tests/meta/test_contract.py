"""Meta-tests: the project's own promises, checked mechanically.

- every hookspec is documented in the fixed shape and exercised by some test;
- every plugin distribution has exactly one ``diffstudio`` entry point, ``py.typed`` and a README;
- no plugin imports another plugin, except distributions it declares as dependencies;
- plugin entry modules import no torch;
- no source file grows past the size cap.
"""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from diffstudio import hookspecs

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_DIRS = sorted(p for p in (ROOT / "plugins").iterdir() if (p / "pyproject.toml").exists())
MAX_LINES = 650


def _pyproject(folder: Path) -> dict[str, object]:
    with open(folder / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle)


def _import_name(dist_name: str) -> str:
    return dist_name.replace("-", "_")


def _spec_functions() -> dict[str, object]:
    return {name: getattr(hookspecs, name) for name in hookspecs.HOOK_NAMES}


def test_hook_names_list_is_complete() -> None:
    marked = {name for name, fn in vars(hookspecs).items() if hasattr(fn, "diffstudio_spec")}
    assert marked == set(hookspecs.HOOK_NAMES)


@pytest.mark.parametrize("name", hookspecs.HOOK_NAMES)
def test_hookspec_documented(name: str) -> None:
    fn = _spec_functions()[name]
    doc = inspect.getdoc(fn) or ""
    params = [p for p in inspect.signature(fn).parameters]  # type: ignore[arg-type]
    assert doc.splitlines()[0].endswith("."), f"{name}: summary line"
    assert "Called" in doc, f"{name}: must say who calls it and when"
    for param in params:
        assert f":param {param}:" in doc, f"{name}: parameter {param} undocumented"
    assert ":return:" in doc, f"{name}: return contract"
    fixed = ("All results are collected", "Stops at first non-None result; return None to mean *not mine*")
    assert any(sentence in doc for sentence in fixed), f"{name}: collected or firstresult sentence"
    assert "Wrappers" in doc, f"{name}: say whether wrappers are allowed"


@pytest.mark.parametrize("name", hookspecs.HOOK_NAMES)
def test_hookspec_exercised_by_a_test(name: str) -> None:
    test_files = [p for p in ROOT.rglob("test_*.py") if ".venv" not in p.parts and p != Path(__file__)]
    texts = "\n".join(p.read_text(encoding="utf-8") for p in test_files)
    accessor = {
        "register_pipelines": "pipelines()",
        "register_embedded_models": "embedded_models()",
        "register_schedulers": "schedulers()",
        "register_lora_formats": "lora_formats()",
        "register_converters": "converters()",
        "register_commands": "commands()",
        "register_templates": "templates()",
    }.get(name, name)
    assert accessor in texts, f"no test exercises the hook {name} (looked for {accessor!r})"


def test_every_hook_has_a_facade_method() -> None:
    from diffstudio._hooks import Hooks

    facade = set(dir(Hooks))
    for name in hookspecs.HOOK_NAMES:
        expected = name.removeprefix("register_") if name.startswith("register_") else name
        expected = {"load_model": "load_model", "pipeline_unit": "pipeline_units"}.get(expected, expected)
        assert expected in facade, f"Hooks has no method for {name}"


@pytest.mark.parametrize("folder", PLUGIN_DIRS, ids=lambda p: p.name)
def test_plugin_distribution_shape(folder: Path) -> None:
    project = _pyproject(folder)["project"]
    assert isinstance(project, dict)
    name = project["name"]
    assert isinstance(name, str) and name.startswith("diffstudio-")
    entry_points = project.get("entry-points", {}).get("diffstudio", {})
    assert len(entry_points) == 1, f"{name} must declare exactly one diffstudio entry point"
    package = folder / "src" / _import_name(name)
    assert (package / "py.typed").exists(), f"{name}: py.typed missing"
    assert (folder / "README.md").exists(), f"{name}: README.md missing"
    deps = " ".join(project.get("dependencies", []))
    assert "diffstudio-core" in deps and "torch>=2.4" in deps.replace(" ", "") or "torch" not in deps


def _imported_top_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("folder", PLUGIN_DIRS, ids=lambda p: p.name)
def test_plugin_imports_no_other_plugin(folder: Path) -> None:
    project = _pyproject(folder)["project"]
    assert isinstance(project, dict)
    own = _import_name(project["name"])
    declared = {
        _import_name(re.split(r"[\s<>=~!;\[]", dep, maxsplit=1)[0].lower())
        for dep in project.get("dependencies", [])
    }
    others = {
        _import_name(_pyproject(p)["project"]["name"])  # type: ignore[index]
        for p in PLUGIN_DIRS
        if p != folder
    }
    for path in (folder / "src").rglob("*.py"):
        bad = (_imported_top_modules(path) & others) - declared - {own}
        assert not bad, f"{path.relative_to(ROOT)} imports undeclared plugin(s) {sorted(bad)}"


@pytest.mark.parametrize("folder", PLUGIN_DIRS, ids=lambda p: p.name)
def test_entry_module_imports_no_torch(folder: Path) -> None:
    project = _pyproject(folder)["project"]
    assert isinstance(project, dict)
    (target,) = project["entry-points"]["diffstudio"].values()
    src = folder / "src"
    code = (
        f"import sys; sys.path.insert(0, {str(src)!r}); import importlib; importlib.import_module({target!r}); "
        "sys.exit(3 if 'torch' in sys.modules else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{target}: imported torch or failed: {result.stderr[-400:]}"


def test_core_import_is_cheap() -> None:
    code = "import sys, diffstudio, diffstudio.runtime; sys.exit(3 if 'torch' in sys.modules else 0)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_no_source_file_over_the_size_cap() -> None:
    sources = [
        p
        for base in ("core/src", "template_sdk/src", "plugins")
        for p in (ROOT / base).rglob("*.py")
        if ".venv" not in p.parts
    ]
    too_long = {str(p.relative_to(ROOT)): n for p in sources if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not too_long, f"files over {MAX_LINES} lines: {too_long}"
