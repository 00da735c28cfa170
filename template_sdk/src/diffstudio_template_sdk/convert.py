"""Converting a seed-format template folder (``model.py`` + weights) into an installable template package.

A data-only template names a class that an installed package registers, so a seed-format folder whose class no
package registers cannot become data-only by itself. :func:`package_seed_template` writes that package from the
folder alone: the reviewed ``model.py`` (the exact bytes whose SHA-256 was checked when it was loaded with trust),
an entry module that registers ``TEMPLATE_MODEL`` under a name, and the loaded (optionally re-trained) weights.
Once installed (``pip install OUT``) the template loads by name with no ``trust_code``, and
``diffstudio template export NAME DIR`` writes its data-only folder for publishing.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffstudio._io import atomic_write_bytes, atomic_write_text
from diffstudio.errors import CodeHashMismatchError, TemplateError, TemplateFormatError

from diffstudio_template_sdk.scaffold import ScaffoldError, package_names

if TYPE_CHECKING:
    from diffstudio.templates.loading import LoadedTemplate

__all__ = ["default_template_name", "package_seed_template"]

_WEIGHTS = "weights/model.safetensors"

_PYPROJECT = """[build-system]
requires = ["setuptools>=68", "wheel"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.1.0"
description = "Diffusion Template {name!s} for diffstudio, converted from a seed-format folder"
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["diffstudio-template-sdk ~= 1.0", "torch>=2.4"]

[project.entry-points.diffstudio]
{module} = "{module}.plugin"

[tool.setuptools.packages.find]
where = ["src"]

[tool.setuptools.package-data]
{module} = ["py.typed", "weights/*.safetensors"]
"""

_PLUGIN = '''"""Entry module of {dist}: registers {name!r} (converted from {source_name!r}; no torch at import time)."""

import json

from diffstudio_template_sdk.registration import template, templates_hook

register_templates = templates_hook(
    template(
        {name!r},
        "{module}.model:TEMPLATE_MODEL",
        {description!r},
        config=json.loads({config!r}),
        weights="{module}:{weights}",
        data_processor={processor},
        dit_geometry=json.loads({geometry!r}),
    )
)
'''

_README = """# {dist}

The Diffusion Template `{name}`, converted by `diffstudio template export --trust-code` from the seed-format
folder `{source}`. `src/{module}/model.py` is that folder's `model.py` byte for byte (sha256 `{sha256}`);
`src/{module}/weights/model.safetensors` holds the weights it loaded{checkpoint}.

```bash
pip install .                                   # then no --trust-code is needed:
diffstudio run "a prompt" --template {name} --template-input '{{...}}'
diffstudio template export {name} data-only/    # template.json + model.safetensors, to publish
```
"""


def default_template_name(folder: Path) -> str:
    """A registry name derived from a folder name: lowercase letters, digits and dashes (``My_Tint`` -> ``my-tint``)."""
    base = re.sub(r"[^a-z0-9]+", "-", folder.resolve().name.lower()).strip("-")
    if not base or not base[0].isalpha():
        base = f"template-{base}".strip("-")
    return base


def _names(name: str) -> dict[str, str]:
    org, _, last = name.rpartition("/")
    if org and not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", org):
        raise ScaffoldError(f"template name {name!r}: the part before '/' must be lowercase letters, digits, dashes")
    return package_names(last)


def package_seed_template(
    loaded: LoadedTemplate,
    out: str | Path,
    *,
    name: str | None = None,
    checkpoint: str | None = None,
) -> dict[str, Any]:
    """Write an installable template package for a trusted, loaded seed-format template.

    Args:
        loaded: The template as :func:`diffstudio.templates.load_template` returned it with ``trust_code=True``
            (``kind == "code"``), trained weights already applied if any.
        out: The package folder to create (must not exist, or be empty).
        name: Registry name (default: from the source folder's name).
        checkpoint: The checkpoint that was applied, for the README.

    Returns:
        ``{"package", "template", "module", "code_sha256", "install"}``.

    Raises:
        TemplateError: ``loaded`` is not a seed-format template, or ``out`` is not empty.
        CodeHashMismatchError: ``model.py`` changed since it was loaded (its bytes are not the ones that ran).
        TemplateFormatError: The template's config is not JSON-serialisable.
    """
    from safetensors.torch import save

    if loaded.kind != "code" or loaded.code_sha256 is None:
        raise TemplateError(f"{loaded.source} is not a seed-format template; only those are converted to a package")
    source = Path(loaded.source)
    code = (source / "model.py").read_bytes()
    if hashlib.sha256(code).hexdigest() != loaded.code_sha256:
        raise CodeHashMismatchError(
            f"{source / 'model.py'} changed after it was loaded (sha256 {loaded.code_sha256} ran); nothing was "
            f"written. Inspect it again and rerun the export."
        )
    name = name or default_template_name(source)
    names = _names(name)
    folder = Path(out)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise TemplateError(f"{folder} exists and is not an empty folder; choose a new output folder for the package")
    try:
        config = json.dumps(loaded.config)
        geometry = json.dumps(loaded.dit_geometry)
    except (TypeError, ValueError) as exc:
        raise TemplateFormatError(f"{source}: TEMPLATE_MODEL_CONFIG is not JSON-serialisable: {exc}") from exc
    package = folder / "src" / names["module"]
    state = {k: t.detach().to("cpu").contiguous().clone() for k, t in loaded.model.state_dict().items()}
    atomic_write_bytes(package / _WEIGHTS, save(state, metadata={"format": "pt", "template": name}))
    atomic_write_bytes(package / "model.py", code)
    processor = f'"{names["module"]}.model:TEMPLATE_DATA_PROCESSOR"' if loaded.data_processor is not None else "None"
    fields = {"dist": names["dist"], "module": names["module"], "name": name, "source_name": source.name,
              "source": str(source), "sha256": loaded.code_sha256, "config": config, "geometry": geometry,
              "weights": _WEIGHTS, "processor": processor,
              "description": f"{name}: converted from the seed-format folder {source.name}",
              "checkpoint": f", with {checkpoint} applied" if checkpoint else ""}  # fmt: skip
    atomic_write_text(package / "plugin.py", _PLUGIN.format(**fields))
    atomic_write_text(package / "__init__.py", f'"""{names["dist"]}: the {name} Diffusion Template."""\n')
    atomic_write_text(package / "py.typed", "")
    atomic_write_text(folder / "pyproject.toml", _PYPROJECT.format(**fields))
    atomic_write_text(folder / "README.md", _README.format(**fields))
    return {"package": str(folder), "template": name, "module": names["module"], "code_sha256": loaded.code_sha256,
            "install": f"pip install {folder}"}  # fmt: skip
