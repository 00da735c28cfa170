"""A component's own configuration: the diffusers ``config.json`` beside its weights, or one the user passes.

Config first (DESIGN.md section 2): a loader reads what the files say before it infers anything from tensor
shapes. :func:`read_component_config` returns the ``config.json`` next to the first weight file when its
``_class_name`` is one the loader expects, with the fields of ``ModelConfig(config=...)`` laid over it (a dict,
a ``config.json`` path or a folder holding one). Families translate the fields they understand into their
params (see :meth:`diffstudio.dit.params.DitParams.from_state_dict_shapes`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffstudio._io import read_json
from diffstudio.errors import ConfigError

if TYPE_CHECKING:
    from diffstudio.config import ModelConfig
    from diffstudio.loading.checkpoint import Checkpoint

#: How to pass sizes that no file carries; loaders append it to the errors of their inference fallback.
HOW_TO_PASS = (
    "put the diffusers config.json beside the weights, or pass the value: ModelConfig(path=..., config={example}) "
    "(or config='path/to/config.json')"
)


@dataclass(frozen=True)
class ComponentConfig:
    """The configuration fields of one component and where they came from.

    Attributes:
        values: ``config.json`` fields (the user's override laid over the file beside the weights).
        source: Where they came from, for messages (``"transformer/config.json"``, ``"ModelConfig(config=...)"``).
        given: The field names the user passed explicitly.
    """

    values: dict[str, Any]
    source: str
    given: frozenset[str] = field(default_factory=frozenset)

    def get(self, name: str, default: Any = None) -> Any:
        """The value of a field, or ``default`` when the configuration does not carry it (or it is null)."""
        value = self.values.get(name)
        return default if value is None else value

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.values.get(name) is not None

    def typed(self, name: str, kind: str, default: Any = None) -> Any:
        """The value of a field checked and converted to ``kind`` (``default`` when absent).

        Args:
            name: The ``config.json`` field.
            kind: ``"int"``, ``"float"`` (finite), ``"bool"`` or ``"ints"`` (a non-empty list of ints, as a tuple).
            default: Returned as is when the field is absent or null.

        Raises:
            ConfigError: The value has another type.
        """
        if name not in self:
            return default
        value = self.values[name]
        try:
            return _KINDS[kind](value)
        except TypeError as exc:
            raise ConfigError(f"{self.source}: {name}={value!r} must be {exc}; fix the config") from None


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("an integer")
    return value


def _float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError("a finite number")
    return float(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("true or false")
    return value


def _ints(value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise TypeError("a non-empty list of integers")
    try:
        return tuple(_int(v) for v in value)
    except TypeError:
        raise TypeError("a non-empty list of integers") from None


_KINDS: dict[str, Callable[[Any], Any]] = {"int": _int, "float": _float, "bool": _bool, "ints": _ints}


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what} {path} cannot be read as JSON ({exc}); fix or remove the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} holds a JSON {type(data).__name__}, not an object of config fields")
    return data


def explicit_config(value: Mapping[str, Any] | str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """The fields of a ``ModelConfig(config=...)`` value: a dict as given, or the ``config.json`` it names.

    Raises:
        ConfigError: The file is missing, is not JSON or holds no object.
    """
    if value is None:
        return None
    if isinstance(value, Mapping):
        return dict(value)
    path = Path(value)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"config={os.fspath(value)!r}: {path} does not exist; pass a config.json or a dict")
    return _read_json(path, "config=")


def read_component_config(
    checkpoint: Checkpoint, model_config: ModelConfig | None = None, class_names: tuple[str, ...] = ()
) -> ComponentConfig | None:
    """The component's configuration: the ``config.json`` beside its weights, overridden by ``config=``.

    A ``config.json`` beside the weights counts when its ``_class_name`` is one of ``class_names`` (any, when
    that is empty); another class's file (e.g. a repository root's) is not this component's and is ignored.
    The user's explicit fields are taken whatever their ``_class_name``.

    Args:
        checkpoint: The opened weights; the first file's folder is searched.
        model_config: The user's ``ModelConfig``; its ``config`` field is the override.
        class_names: The diffusers classes whose ``config.json`` describes this component.

    Returns:
        The merged fields, or None when neither exists.

    Raises:
        ConfigError: A ``config.json`` of the expected class, or the override, cannot be read.
    """
    values: dict[str, Any] = {}
    sources: list[str] = []
    if checkpoint.files:
        beside = Path(checkpoint.files[0]).parent / "config.json"
        if beside.is_file():
            data = _read_json(beside, "the config beside the weights,")
            if not class_names or data.get("_class_name") in class_names:
                values.update(data)
                sources.append(str(beside))
    given = explicit_config(model_config.config if model_config is not None else None)
    if given is not None:
        values.update(given)
        sources.append("ModelConfig(config=...)")
    if not sources:
        return None
    return ComponentConfig(values, " + ".join(sources), frozenset(given or ()))
