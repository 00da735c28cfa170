"""Writing data-only templates: ``template.json`` + ``model.safetensors``, loadable with no code execution."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffstudio._io import atomic_write_bytes, atomic_write_text
from diffstudio._version import __version__
from diffstudio.errors import TemplateError, TemplateFormatError
from diffstudio.templates.geometry import normalise_geometry, resolve_geometry
from diffstudio.templates.loading import FORMAT_NAME, FORMAT_VERSION, TEMPLATE_JSON

if TYPE_CHECKING:
    from torch import nn

    from diffstudio.runtime import Runtime

WEIGHTS_FILE = "model.safetensors"

__all__ = ["WEIGHTS_FILE", "apply_checkpoint", "export_template", "registered_name_of"]


def registered_name_of(model: nn.Module, runtime: Runtime) -> str | None:
    """The registry name whose class is exactly ``type(model)``, or None."""
    for spec in runtime.hooks.templates():
        try:
            if spec.factory() is type(model):
                return spec.name
        except Exception:  # noqa: BLE001, S112 - a broken factory simply does not match
            continue
    return None


def export_template(
    model: nn.Module,
    folder: str | os.PathLike[str],
    *,
    name: str | None = None,
    config: Mapping[str, Any] | None = None,
    runtime: Runtime | None = None,
    description: str | None = None,
    dit_geometry: Mapping[str, int] | None = None,
    target_model: str | None = None,
) -> Path:
    """Write ``model`` as a data-only template folder.

    Args:
        model: The template model; its class must be registered by an installed package (data-only templates run
            no code, so whoever loads the folder needs that package).
        folder: Output folder (created). ``model.safetensors`` and ``template.json`` are written atomically.
        name: The registered name of the model's class (default: looked up in the registry).
        config: Constructor keyword arguments (JSON-serialisable); default: the model's ``template_config``
            attribute (a dict or a method returning one), else ``{}``.
        runtime: The plugin runtime holding the registry.
        description: Free text stored in ``template.json``.
        dit_geometry: The DiT geometry the template was made for (default: what the model declares as its
            ``dit_geometry`` attribute, else the registration's); recorded so that loaders refuse another DiT.
        target_model: The model it was made for (default: the registration's ``target_model``).

    Returns:
        The folder.

    Raises:
        TemplateError: The class is not registered, or ``name`` registers another class.
        TemplateFormatError: ``config`` is not JSON-serialisable.
    """
    from safetensors.torch import save

    from diffstudio.runtime import Runtime

    runtime = runtime if runtime is not None else Runtime()
    found = registered_name_of(model, runtime)
    if name is None:
        name = found
    if name is None or name not in runtime.hooks.templates():
        raise TemplateError(
            f"{type(model).__name__} is not a registered template class{f' (named {name!r})' if name else ''}. A "
            f"data-only template names an installed class; put the class in a template package "
            f"(`diffstudio template new NAME`), install it, then export."
        )
    if found != name:
        raise TemplateError(f"the registered template {name!r} is not the class {type(model).__name__} of this model")
    if config is None:
        attribute = getattr(model, "template_config", None)
        config = attribute() if callable(attribute) else attribute if isinstance(attribute, Mapping) else {}
    try:
        config_json = json.loads(json.dumps(dict(config)))
    except TypeError as exc:
        raise TemplateFormatError(f"template config {config!r} is not JSON-serialisable: {exc}") from exc
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    state = {key: tensor.detach().to("cpu").contiguous().clone() for key, tensor in model.state_dict().items()}
    atomic_write_bytes(out / WEIGHTS_FILE, save(state, metadata={"format": "pt", "template": name}))
    spec = runtime.hooks.templates().get(name)
    where = f"export of {name!r}"
    geometry = resolve_geometry(model, where, ("dit_geometry=", normalise_geometry(dit_geometry, "dit_geometry=")),
                                default=(f"the registration of {name!r}", spec.dit_geometry))  # fmt: skip
    record: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "template": name,
        "config": config_json,
        "weights": [WEIGHTS_FILE],
        "base_pipeline": spec.base_pipeline,
        "written_by": f"diffstudio-core {__version__}",
    }
    if geometry is not None:
        record["dit_geometry"] = geometry
    target = target_model or spec.target_model
    if target:
        record["target_model"] = target
    if description:
        record["description"] = description
    atomic_write_text(out / TEMPLATE_JSON, json.dumps(record, indent=2) + "\n")
    return out


def apply_checkpoint(model: nn.Module, path: str | os.PathLike[str], *, remove_prefix: str = "") -> list[str]:
    """Load trained weights (e.g. a trainer's ``epoch-1.safetensors``) into a template model.

    The checkpoint may hold only the trained part (``--trainable_models template_model.mlp``); every key it has
    must exist in the model. This is the seed's packaging step (``load_state_dict`` + ``state_dict.update``).

    Args:
        model: The template model.
        path: A safetensors file.
        remove_prefix: Stripped from the start of every key (``"pipe.template_model."``).

    Returns:
        The model keys the checkpoint did not cover (left as they were).

    Raises:
        TemplateFormatError: Keys the model does not have, or shapes that differ.
    """
    from diffstudio.templates.loading import load_state_dict

    state = {
        (k[len(remove_prefix) :] if remove_prefix and k.startswith(remove_prefix) else k): v
        for k, v in load_state_dict(path).items()
    }
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise TemplateFormatError(
            f"{path} has {len(unknown)} key(s) the template does not, e.g. {unknown[:5]}; wrong template or prefix "
            f"(try --remove-prefix pipe.template_model.)"
        )
    wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise TemplateFormatError(f"{path}: shapes differ from the template's for {wrong[:5]}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
    return sorted(set(own) - set(state))
