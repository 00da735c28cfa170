"""The import-linter contracts (``.importlinter``, run by ``make lint``) follow the plugins' declared dependencies.

Each plugin has a contract ``<distribution>-deps`` forbidding every other plugin (and the template SDK) that its
``pyproject.toml`` does not list in ``[project] dependencies``: adding a dependency means adding it in both places,
and a new plugin needs its contract (issue 20.7).
"""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def _distributions() -> dict[str, tuple[str, list[str]]]:
    """``{distribution: (top-level package, [dependency distributions])}`` for each plugin and the SDK."""
    found: dict[str, tuple[str, list[str]]] = {}
    for pyproject in sorted([*ROOT.glob("plugins/*/pyproject.toml"), ROOT / "template_sdk" / "pyproject.toml"]):
        if pyproject.parent.name.startswith("_"):  # the plugin template is a scaffold, not a distribution
            continue
        project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
        packages = [p.name for p in (pyproject.parent / "src").iterdir() if p.is_dir() and p.name.isidentifier()]
        deps = [re.split(r"[ ~=<>!\[;]", d, maxsplit=1)[0] for d in project.get("dependencies", [])]
        found[project["name"]] = (packages[0], deps)
    return found


def _contracts() -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    assert config.read(ROOT / ".importlinter"), ".importlinter is missing"
    return config


def _lines(value: str) -> set[str]:
    return {line.strip() for line in value.splitlines() if line.strip()}


def test_plugin_contracts_follow_declared_dependencies() -> None:
    dists = _distributions()
    package_of = {name: package for name, (package, _) in dists.items()}
    config = _contracts()
    for name, (package, deps) in dists.items():
        if name == "diffstudio-template-sdk":
            continue
        section = f"importlinter:contract:{name}-deps"
        assert config.has_section(section), f"{name} has no import-linter contract [{section}] in .importlinter"
        allowed = {package} | {package_of[d] for d in deps if d in package_of}
        expected = set(package_of.values()) - allowed
        assert _lines(config[section]["source_modules"]) == {package}
        forbidden = _lines(config[section]["forbidden_modules"])
        assert forbidden == expected, (
            f"[{section}] forbids {sorted(forbidden)}, but {name}'s pyproject allows {sorted(allowed)}: forbid "
            f"exactly {sorted(expected)}"
        )


def test_every_distribution_is_a_root_package() -> None:
    roots = _lines(_contracts()["importlinter"]["root_packages"])
    packages = {package for package, _ in _distributions().values()} | {"diffstudio"}
    assert packages <= roots, f"add {sorted(packages - roots)} to root_packages in .importlinter"


def test_lint_target_runs_import_linter() -> None:
    lint = re.search(r"^lint:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M)
    assert lint is not None and "lint-imports" in lint.group(1)


def test_importlinter_is_the_generated_file() -> None:
    """``.importlinter`` equals what scripts/gen_importlinter.py writes, so a new plugin cannot be left out of it."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_importlinter.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
