"""The template model protocol: what a template class must look like, and how it is called.

A template model is an ``nn.Module`` with two methods, both accepting ``**kwargs``:

* ``process_inputs(self, <template inputs>, pipe=None, **kwargs) -> dict``: runs without gradients
  (the caller wraps it in ``torch.no_grad()``; decorate it with ``@torch.no_grad()`` too). It may use the base
  pipeline's components through the reserved ``pipe`` argument (e.g. its text encoder or VAE).
* ``forward(self, <outputs of process_inputs>, pipe=None, use_gradient_checkpointing=False,
  use_gradient_checkpointing_offload=False, **kwargs) -> dict``: holds every computation that training
  differentiates and returns the **template cache**, a mapping whose keys are inputs of the base pipeline
  (``kv_cache``, ``lora``, ``block_residuals``, ...).

``model_id`` is reserved: it routes one template-input dict to one of several loaded templates and is never
passed to the methods. The split into two methods lets trainers cache ``process_inputs`` outputs (two-stage
"split" training) and backpropagate through ``forward`` only.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from diffstudio.errors import TemplateFormatError, TemplateInputError

#: Argument names the framework passes itself; template inputs may not use them.
RESERVED_INPUTS: frozenset[str] = frozenset(
    {"pipe", "model_id", "use_gradient_checkpointing", "use_gradient_checkpointing_offload"}
)

__all__ = [
    "RESERVED_INPUTS",
    "check_template_class",
    "forward_template",
    "input_names",
    "process_template_inputs",
    "run_template",
]


def _parameters(fn: Callable[..., Any]) -> list[inspect.Parameter]:
    params = list(inspect.signature(fn).parameters.values())
    return [p for p in params if p.name != "self"]


def input_names(fn: Callable[..., Any]) -> tuple[list[str], list[str]]:
    """Return ``(required, optional)`` named parameters of a template method, reserved names excluded."""
    required: list[str] = []
    optional: list[str] = []
    for p in _parameters(fn):
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.name in RESERVED_INPUTS:
            continue
        (required if p.default is p.empty else optional).append(p.name)
    return required, optional


def check_template_class(cls: Any, where: str = "") -> None:
    """Raise ``TemplateFormatError`` unless ``cls`` follows the template model protocol.

    Checks: it is an ``nn.Module`` subclass; ``process_inputs`` and ``forward`` exist and accept ``**kwargs``;
    neither names ``model_id`` as a parameter.

    Args:
        cls: The class (or an instance of it).
        where: Where it came from, for messages (a file, a registered name).
    """
    import torch

    klass = cls if isinstance(cls, type) else type(cls)
    origin = f" ({where})" if where else ""
    if not issubclass(klass, torch.nn.Module):
        raise TemplateFormatError(f"template class {klass.__name__}{origin} must subclass torch.nn.Module")
    for method in ("process_inputs", "forward"):
        fn = getattr(klass, method, None)
        if not callable(fn):
            raise TemplateFormatError(f"template class {klass.__name__}{origin} has no {method}() method")
        params = _parameters(fn)
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            raise TemplateFormatError(
                f"{klass.__name__}.{method}{inspect.signature(fn)}{origin} must accept **kwargs (the framework "
                f"passes reserved arguments such as pipe and use_gradient_checkpointing)"
            )
        if any(p.name == "model_id" for p in params):
            raise TemplateFormatError(
                f"{klass.__name__}.{method}(){origin} names the parameter 'model_id', which is reserved for routing "
                f"template inputs between several templates; rename it"
            )


def _check_inputs(model: Any, inputs: Mapping[str, Any], name: str) -> None:
    fn = model.process_inputs
    required, optional = input_names(fn)
    reserved = sorted(set(inputs) & (RESERVED_INPUTS - {"model_id"}))
    if reserved:
        raise TemplateInputError(
            f"template inputs for {name!r} use the reserved name(s) {reserved}; the framework passes these itself"
        )
    missing = [key for key in required if key not in inputs]
    if missing:
        raise TemplateInputError(
            f"the template {name!r} needs the input(s) {missing} (process_inputs{inspect.signature(fn)}); got "
            f"{sorted(inputs) or 'no inputs'}"
        )
    if getattr(model, "accepts_extra_inputs", False):
        return
    unknown = sorted(set(inputs) - set(required) - set(optional))
    if unknown:
        raise TemplateInputError(
            f"the template {name!r} does not accept the input(s) {unknown}; it takes "
            f"{sorted(required + optional) or 'no named inputs'} (process_inputs{inspect.signature(fn)}). "
            f"Templates that read **kwargs set the class attribute accepts_extra_inputs = True."
        )


def process_template_inputs(
    model: Any, inputs: Mapping[str, Any], *, pipe: Any = None, name: str = "template"
) -> dict[str, Any]:
    """Stage 1, without gradients: ``model.process_inputs(pipe=pipe, **inputs)``.

    Args:
        model: The template model.
        inputs: One template-input dict (``model_id`` is dropped).
        pipe: The base pipeline (for templates that use its components).
        name: The template's name, for messages.

    Returns:
        The processed inputs (the keyword arguments of ``forward``).

    Raises:
        TemplateInputError: Inputs the template does not accept, required inputs missing, reserved names used.
        TemplateFormatError: ``process_inputs`` did not return a mapping.
    """
    import torch

    user = {k: v for k, v in inputs.items() if k != "model_id"}
    _check_inputs(model, user, name)
    with torch.no_grad():
        processed = model.process_inputs(pipe=pipe, **user)
    if not isinstance(processed, Mapping):
        raise TemplateFormatError(
            f"{type(model).__name__}.process_inputs() of template {name!r} returned {type(processed).__name__}; "
            "it must return a dict of forward() arguments"
        )
    return dict(processed)


def forward_template(
    model: Any,
    processed: Mapping[str, Any],
    *,
    pipe: Any = None,
    use_gradient_checkpointing: bool = False,
    use_gradient_checkpointing_offload: bool = False,
    name: str = "template",
) -> dict[str, Any]:
    """Stage 2, under the caller's grad mode: ``model.forward(**processed, pipe=pipe, ...)`` -> template cache.

    Trainers call this with gradients enabled; nothing here detaches, so the loss reaches the template's
    parameters through every cache tensor.

    Raises:
        TemplateFormatError: ``forward`` did not return a mapping.
    """
    cache = model(
        pipe=pipe,
        use_gradient_checkpointing=use_gradient_checkpointing,
        use_gradient_checkpointing_offload=use_gradient_checkpointing_offload,
        **processed,
    )
    if not isinstance(cache, Mapping):
        raise TemplateFormatError(
            f"{type(model).__name__}.forward() of template {name!r} returned {type(cache).__name__}; it must "
            "return the template cache, a dict keyed by base-pipeline inputs"
        )
    return dict(cache)


def run_template(model: Any, inputs: Mapping[str, Any], *, pipe: Any = None, name: str = "template") -> dict[str, Any]:
    """Both stages: template inputs -> template cache (``forward`` under the caller's grad mode)."""
    processed = process_template_inputs(model, inputs, pipe=pipe, name=name)
    return forward_template(model, processed, pipe=pipe, name=name)
