"""Registering template classes from an installed package, with no torch import at registration time.

In the package's entry module (``[project.entry-points.diffstudio]``)::

    from diffstudio_template_sdk.registration import template, templates_hook

    register_templates = templates_hook(
        template(
            "my-org/brightness",                        # the name users load and template.json files name
            "my_package.model:BrightnessTemplate",      # imported only when the template is used
            "brightness control through a KV cache",
            weights="my_package:weights/model.safetensors",   # optional package data
            data_processor="my_package.model:BrightnessData", # optional, for training
        )
    )
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from diffstudio._markers import hookimpl
from diffstudio.errors import TemplateFormatError
from diffstudio.templates.geometry import normalise_geometry
from diffstudio.types import TemplateSpec

__all__ = ["import_object", "package_file", "template", "templates_hook"]


def import_object(target: str) -> Any:
    """Import ``"package.module:Name"`` and return ``Name``."""
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise TemplateFormatError(f"{target!r} must look like 'package.module:ClassName'")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise TemplateFormatError(f"{module_name} has no attribute {attribute!r} (from {target!r})") from None


def package_file(target: str) -> Path:
    """Resolve ``"package:relative/path"`` to a file shipped inside an installed package."""
    package, sep, relative = target.partition(":")
    if not sep or not package or not relative:
        raise TemplateFormatError(f"{target!r} must look like 'package:relative/path.safetensors'")
    path = Path(str(resources.files(package).joinpath(relative)))
    if not path.is_file():
        raise TemplateFormatError(f"{target!r}: {path} is not a file in the installed package")
    return path


def template(
    name: str,
    cls: str | Callable[[], type[Any]],
    description: str,
    *,
    base_pipeline: str = "flux2",
    config: Mapping[str, Any] | None = None,
    weights: str | Sequence[str] | None = None,
    data_processor: str | None = None,
    target_model: str | None = None,
    dit_geometry: Mapping[str, int] | None = None,
) -> TemplateSpec:
    """Describe one template class for ``register_templates``.

    Args:
        name: Registry name (``"org/name"`` style is recommended).
        cls: ``"package.module:Class"`` (imported lazily) or a factory returning the class.
        description: One line for listings.
        base_pipeline: The registered pipeline its cache is made for.
        config: Constructor kwargs used when the template is loaded by name.
        weights: ``"package:relative/file.safetensors"`` (or a list of shards) shipped in the package.
        data_processor: ``"package.module:Class"`` of the training data processor.
        target_model: The model it was made for (``"diffstudio/shapes"``), shown by ``diffstudio templates``.
        dit_geometry: The DiT geometry it was made for, ``{"double_blocks", "single_blocks", "heads", "head_dim"}``
            (the embedded model: 2, 4, 2, 64); a pipeline whose DiT differs is refused before the template runs.
    """
    factory: Callable[[], type[Any]] = (lambda: import_object(cls)) if isinstance(cls, str) else cls
    files = [weights] if isinstance(weights, str) else list(weights or [])
    return TemplateSpec(
        name=name,
        factory=factory,
        description=description,
        base_pipeline=base_pipeline,
        config=dict(config or {}),
        weights=(lambda: [package_file(f) for f in files]) if files else None,
        data_processor=(lambda: import_object(data_processor)) if data_processor else None,
        target_model=target_model,
        dit_geometry=normalise_geometry(dit_geometry, f"template({name!r}, dit_geometry=...)"),
    )


def templates_hook(*specs: TemplateSpec) -> Callable[[Callable[[TemplateSpec], None]], None]:
    """Return a ``register_templates`` hook implementation that registers ``specs``.

    Assign it to a module attribute named ``register_templates`` in the entry module.
    """

    def register_templates(register: Callable[[TemplateSpec], None]) -> None:
        """Register this package's template classes."""
        for spec in specs:
            register(spec)

    marked: Callable[[Callable[[TemplateSpec], None]], None] = hookimpl(register_templates)
    return marked
