"""Structural types a template package implements (no torch at import time).

:class:`TemplateModel` is what :class:`~diffstudio.templates.TemplatePipeline` calls; the concrete class must
also subclass ``torch.nn.Module`` (checked by :func:`~diffstudio.templates.check_template_class`).
:class:`DataProcessor` turns a data set row's ``template_inputs`` into ``process_inputs`` keyword arguments during
training (e.g. computing a brightness label from the training image).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

__all__ = ["DataProcessor", "TemplateModel"]


@runtime_checkable
class TemplateModel(Protocol):
    """A template model: template inputs -> (``process_inputs``, no grad) -> (``forward``, grad) -> cache.

    Both methods accept ``**kwargs``; ``pipe`` (the base pipeline), ``use_gradient_checkpointing`` and
    ``use_gradient_checkpointing_offload`` are passed by the framework, ``model_id`` never is.
    """

    def process_inputs(self, **kwargs: Any) -> Mapping[str, Any]:
        """Turn one template-input dict into ``forward`` arguments, without gradients."""
        ...

    def forward(self, **kwargs: Any) -> Mapping[str, Any]:
        """Return the template cache: a dict keyed by base-pipeline inputs (``kv_cache``, ``lora``, ...)."""
        ...


@runtime_checkable
class DataProcessor(Protocol):
    """Training-time adapter: one data set row's ``template_inputs`` -> ``process_inputs`` keyword arguments."""

    def __call__(self, **kwargs: Any) -> Mapping[str, Any]:
        """Return the keyword arguments of the template's ``process_inputs``."""
        ...
