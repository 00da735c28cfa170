"""Errors of step caching (all :class:`~diffstudio.errors.DiffstudioError`)."""

from __future__ import annotations

from diffstudio.errors import ConfigError, PipelineInputError


class StepCacheError(PipelineInputError):
    """A step-cache argument is wrong (unknown kind, bad threshold) or caching cannot run here (gradients on)."""


class CacheCoefficientsError(ConfigError):
    """TeaCache coefficients are missing, malformed, or were fitted for another DiT."""
