"""The DiT geometry a template was made for, and the check against the pipeline it runs with.

A template whose cache addresses DiT blocks (a KV cache per block, residuals per block, a LoRA per layer) only fits
a DiT with the same number of double- and single-stream blocks, heads and head dim. The geometry is a plain
mapping, ``{"double_blocks": 2, "single_blocks": 4, "heads": 2, "head_dim": 64}`` (the embedded
``diffstudio/shapes`` model), recorded

* by the template class, as an attribute ``dit_geometry`` (derived from its constructor arguments);
* by the registration (``template(..., dit_geometry=...)``), for listings without importing torch;
* in a data-only folder's ``template.json`` (``"dit_geometry"``, written by ``export_template``);
* by a seed-format ``model.py`` as ``TEMPLATE_DIT_GEOMETRY``.

Before a template runs with a pipeline, :func:`check_geometry` compares it with the pipeline DiT's and raises
:class:`~diffstudio.errors.TemplateGeometryError` naming both when they differ. Templates that record no geometry
(and DiTs that do not describe theirs) are not checked. Imports no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffstudio.errors import TemplateFormatError, TemplateGeometryError

GEOMETRY_KEYS: tuple[str, ...] = ("double_blocks", "single_blocks", "heads", "head_dim")

__all__ = [
    "GEOMETRY_KEYS",
    "check_geometry",
    "describe_geometry",
    "geometry_of_model",
    "normalise_geometry",
    "pipeline_geometry",
    "resolve_geometry",
]


def normalise_geometry(value: object, where: str) -> dict[str, int] | None:
    """Validate a recorded geometry: None, or a mapping of exactly :data:`GEOMETRY_KEYS` to non-negative ints.

    Args:
        value: The recorded value.
        where: Where it was read (a file, a registered name), for the message.

    Raises:
        TemplateFormatError: Not a mapping, missing or extra keys, or values that are not plain ints (heads and
            head dim at least 1).
    """
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TemplateFormatError(
            f"{where}: dit_geometry must be an object {{{', '.join(GEOMETRY_KEYS)}}}, got {type(value).__name__}"
        )
    keys = set(value)
    if keys != set(GEOMETRY_KEYS):
        raise TemplateFormatError(
            f"{where}: dit_geometry must have exactly the keys {list(GEOMETRY_KEYS)}; got {sorted(map(str, keys))}"
        )
    out: dict[str, int] = {}
    for key in GEOMETRY_KEYS:
        item = value[key]
        least = 1 if key in ("heads", "head_dim") else 0
        if type(item) is not int or item < least or item > 1_000_000:
            raise TemplateFormatError(f"{where}: dit_geometry[{key!r}] must be an integer >= {least}, got {item!r}")
        out[key] = item
    return out


def describe_geometry(geometry: Mapping[str, int]) -> str:
    """``"2 double + 4 single blocks, 2 heads x 64"``."""
    return (
        f"{geometry['double_blocks']} double + {geometry['single_blocks']} single blocks, "
        f"{geometry['heads']} heads x {geometry['head_dim']}"
    )


def geometry_of_model(model: object, where: str) -> dict[str, int] | None:
    """The geometry a template model declares (its ``dit_geometry`` attribute, or a method returning it)."""
    declared = getattr(model, "dit_geometry", None)
    if callable(declared):
        declared = declared()
    return normalise_geometry(declared, where)


def resolve_geometry(
    model: object,
    where: str,
    *records: tuple[str, object],
    default: tuple[str, object] = ("", None),
) -> dict[str, int] | None:
    """The geometry of a loaded template: the model's own declaration, else a record, else the default.

    Args:
        model: The built template model.
        where: Its origin, for messages.
        *records: ``(where, value)`` pairs that describe this very template (``template.json``'s field,
            ``TEMPLATE_DIT_GEOMETRY``, an explicit argument): each must agree with the model's declaration.
        default: ``(where, value)`` used only when nothing else declares a geometry: the registration's, which
            describes the class with its registered config (a data-only folder may hold another config).

    Raises:
        TemplateFormatError: A record is malformed, or contradicts what the model declares (the folder is
            inconsistent: its weights and its description were made for different models).
    """
    own = geometry_of_model(model, where)
    for source, value in records:
        recorded = normalise_geometry(value, source)
        if recorded is None:
            continue
        if own is None:
            own = recorded
        elif recorded != own:
            raise TemplateFormatError(
                f"{source} records the DiT geometry {describe_geometry(recorded)}, but the template built from it "
                f"declares {describe_geometry(own)}; rewrite it with `diffstudio template export`"
            )
    fallback = normalise_geometry(default[1], default[0])
    return own if own is not None else fallback


def pipeline_geometry(pipe: Any) -> dict[str, int] | None:
    """The geometry of a pipeline's loaded DiT (block names, heads, width), or None when it does not describe it.

    Reads module attributes only (no weights are onloaded).
    """
    has = getattr(pipe, "has", None)
    if pipe is None or not callable(has) or not has("dit"):
        return None
    dit = pipe.dit
    names = getattr(dit, "block_names", None)
    heads = getattr(dit, "num_heads", None)
    hidden = getattr(dit, "hidden_size", None)
    if not isinstance(names, (list, tuple)) or type(heads) is not int or type(hidden) is not int or heads < 1:
        return None
    return {
        "double_blocks": sum(1 for n in names if str(n).startswith("double_")),
        "single_blocks": sum(1 for n in names if str(n).startswith("single_")),
        "heads": heads,
        "head_dim": hidden // heads,
    }


def check_geometry(name: str, recorded: Mapping[str, int] | None, pipe: Any) -> None:
    """Refuse a template made for another DiT than ``pipe``'s.

    Args:
        name: The template's name, for the message.
        recorded: The template's geometry (None: not recorded, not checked).
        pipe: The base pipeline.

    Raises:
        TemplateGeometryError: Both geometries are known and differ.
    """
    if recorded is None:
        return
    actual = pipeline_geometry(pipe)
    if actual is None or dict(recorded) == actual:
        return
    raise TemplateGeometryError(
        f"the template {name!r} was made for a DiT with {describe_geometry(recorded)}, but this pipeline's DiT has "
        f"{describe_geometry(actual)}; use a template built (or trained) for this model, or load the model it was "
        f"made for"
    )
