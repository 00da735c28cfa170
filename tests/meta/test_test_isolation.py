"""Meta-tests: a plugin's tests need nothing their distribution does not declare (issue 20, items 7-8).

The dynamic proof is ``scripts/test-isolated.sh`` (a venv per plugin, run by ``.ci/run``); these static checks give
the same answer in the main suite within a second, for the mistakes found in the review:

- a test imports a diffstudio distribution, or a reference library (diffusers, peft, hypothesis), that its
  plugin declares neither in ``dependencies`` nor in an extra (a ``pytest.importorskip`` of it is fine);
- a test loads a file above its plugin folder by path (``Path(__file__).parents[3] / "benchmarks" ...``);
- CI does not run the isolated script after the main tests.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
from diffstudio.testing import import_file

ROOT = Path(__file__).resolve().parents[2]
ISOLATED = import_file(ROOT / "scripts" / "test_isolated.py")
MEMBERS = ISOLATED.workspace()
PLUGINS = sorted((MEMBERS[n] for n in ISOLATED.testable(MEMBERS)), key=lambda m: m.folder.name)  # and the SDK
REFERENCE_LIBS = ISOLATED.REFERENCE_LIBS


def _test_files(member: object) -> list[Path]:
    return sorted((member.folder / "tests").rglob("*.py"))  # type: ignore[attr-defined]


def _imports(tree: ast.AST) -> dict[str, int]:
    """Top-level modules imported anywhere in ``tree`` (inside functions too), with a line of each."""
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.setdefault(alias.name.split(".")[0], node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.setdefault(node.module.split(".")[0], node.lineno)
    return found


def _skipped_if_absent(tree: ast.AST) -> set[str]:
    """Modules the file guards with ``pytest.importorskip("name...")``."""
    names = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args):
            continue
        first = node.args[0]
        if node.func.attr == "importorskip" and isinstance(first, ast.Constant) and isinstance(first.value, str):
            names.add(first.value.split(".")[0])
    return names


@pytest.mark.parametrize("plugin", PLUGINS, ids=lambda m: m.folder.name)
def test_plugin_tests_import_only_declared_distributions(plugin: object) -> None:
    chosen = ISOLATED.closure(MEMBERS, plugin)
    own = {m for name in chosen for m in MEMBERS[name].modules}
    workspace = {m for member in MEMBERS.values() for m in member.modules}
    declared = ISOLATED.declared_third_party(MEMBERS, chosen)
    references = {m for m, dist in REFERENCE_LIBS.items() if dist not in declared}
    bad = []
    for path in _test_files(plugin):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for module, line in _imports(tree).items():
            if module in (workspace - own) | references and module not in _skipped_if_absent(tree):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "undeclared (add it to the plugin's test extra, or importorskip it): " + "; ".join(bad)


@pytest.mark.parametrize("plugin", PLUGINS, ids=lambda m: m.folder.name)
def test_no_plugin_test_loads_a_file_outside_its_plugin(plugin: object) -> None:
    """No ``.parents[n]`` reaching above ``plugins/<name>/``, and no ``benchmarks`` path (benchmarks import tests)."""
    bad = []
    for path in _test_files(plugin):
        depth = len(path.relative_to(plugin.folder).parts)  # type: ignore[attr-defined]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute)
                    and node.value.attr == "parents" and isinstance(node.slice, ast.Constant)
                    and isinstance(node.slice.value, int) and node.slice.value >= depth):  # fmt: skip
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} climbs out with parents[{node.slice.value}]")
            if isinstance(node, ast.Constant) and node.value == "benchmarks":
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} names benchmarks")
    assert not bad, "; ".join(bad)


def test_every_plugin_has_an_isolated_venv_without_the_families_it_does_not_declare() -> None:
    for plugin in PLUGINS:
        chosen = ISOLATED.closure(MEMBERS, plugin)
        assert plugin.name in chosen and "diffstudio-core" in chosen
        order = ISOLATED.install_order(MEMBERS, chosen)
        assert sorted(order) == sorted(chosen)
        for i, name in enumerate(order):  # pip 23.2 needs a dependency before its dependents
            needs = {ISOLATED.canonicalize_name(r.name) for r in MEMBERS[name].requires} & set(chosen)
            assert needs <= set(order[:i]), f"{plugin.name}: {name} is installed before {needs - set(order[:i])}"
    medium_kv = ISOLATED.closure(MEMBERS, MEMBERS["diffstudio-medium-kv"])
    assert set(medium_kv) == {"diffstudio-core", "diffstudio-template-sdk", "diffstudio-medium-kv"}
    controlnet = ISOLATED.closure(MEMBERS, MEMBERS["diffstudio-controlnet"])
    assert controlnet["diffstudio-flux1"] == {"test"} and "diffstudio-flux2" not in controlnet


def test_ci_runs_the_isolated_script_after_the_main_suite() -> None:
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "make test" in lines
    runs = [i for i, line in enumerate(lines) if "scripts/test-isolated.sh" in line and not line.startswith("#")]
    assert runs and runs[0] > lines.index("make test")


def test_the_isolation_check_reports_undeclared_packages_that_are_importable() -> None:
    """Against the development venv (everything installed), medium-kv's venv check must fail, naming the leaks."""
    chosen = ISOLATED.closure(MEMBERS, MEMBERS["diffstudio-medium-kv"])
    problems = ISOLATED.check_isolation(MEMBERS, chosen, Path(sys.executable))
    assert "importable but not declared: diffstudio_flux1" in problems
    assert "importable but not declared: diffusers" in problems
    assert any(p.startswith("diffstudio entry points") for p in problems)
    assert not any(p.startswith("declared but not importable") for p in problems)
