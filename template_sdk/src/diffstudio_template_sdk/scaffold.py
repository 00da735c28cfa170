"""``diffstudio template new NAME``: write a new template package from the SDK's scaffold."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from string import Template

from diffstudio.errors import DiffstudioError

__all__ = ["ScaffoldError", "new_template_package", "package_names"]

_NAME = re.compile(r"^[a-z][a-z0-9-]*[a-z0-9]$")

#: scaffold file -> destination (relative to the package folder; {module} is replaced).
_FILES = {
    "pyproject.toml.tmpl": "pyproject.toml",
    "README.md.tmpl": "README.md",
    "__init__.py.tmpl": "src/{module}/__init__.py",
    "plugin.py.tmpl": "src/{module}/plugin.py",
    "model.py.tmpl": "src/{module}/model.py",
    "test_template.py.tmpl": "tests/test_{module}.py",
}


class ScaffoldError(DiffstudioError, ValueError):
    """The scaffold cannot be written (bad name, folder exists)."""


def package_names(name: str) -> dict[str, str]:
    """Names derived from ``NAME`` (lowercase, digits, dashes): distribution, module, class, template name."""
    if not _NAME.match(name):
        raise ScaffoldError(f"template name {name!r} must be lowercase letters, digits and dashes, e.g. 'soft-light'")
    base = name.removeprefix("diffstudio-")
    module = "diffstudio_" + base.replace("-", "_")
    class_name = "".join(part.capitalize() for part in base.split("-")) + "Template"
    return {"dist": f"diffstudio-{base}", "module": module, "class_name": class_name, "name": base}


def new_template_package(name: str, destination: str | Path = ".") -> Path:
    """Write a template package ``diffstudio-<name>`` under ``destination``; return its folder.

    The package has a pyproject with the ``diffstudio`` entry point, an entry module that registers the class,
    a KV-cache ``model.py`` to start from, ``py.typed``, a README and a conformance test.
    """
    names = package_names(name)
    folder = Path(destination) / names["dist"]
    if folder.exists():
        raise ScaffoldError(f"{folder} already exists; choose another name or destination")
    source = resources.files("diffstudio_template_sdk").joinpath("scaffold")
    for template_name, target in _FILES.items():
        text = Template(source.joinpath(template_name).read_text(encoding="utf-8")).substitute(names)
        path = folder / target.format(module=names["module"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    (folder / "src" / names["module"] / "py.typed").write_text("")
    return folder
