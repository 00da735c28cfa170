"""Step caching for dual-stream DiTs: TeaCache, First-Block-Cache and TeaCache calibration.

Use: ``pipe(prompt, tea_cache_l1_thresh=0.4)`` (the seed argument), ``pipe(prompt, step_cache="fbcache:0.1")``,
or ``diffstudio run --cache teacache:0.4``. ``pipe.last_run.step_cache`` reports how many steps ran the block
stack. The caches are :class:`~diffstudio.dit.extensions.StackHook` objects (:mod:`diffstudio.cache.hooks`), one
per CFG branch per generation (:mod:`diffstudio.cache.units`); TeaCache's coefficients are bound to the DiT they
were fitted for (:mod:`diffstudio.cache.coefficients`) and fitted by ``diffstudio cache calibrate``
(:mod:`diffstudio.cache.calibrate`).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {
    "FLUX1_DEV": "coefficients", "Coefficients": "coefficients", "DitShape": "coefficients",
    "load_coefficients": "coefficients", "resolve_coefficients": "coefficients",
    "CacheCoefficientsError": "errors", "StepCacheError": "errors",
    "FirstBlockCache": "hooks", "StepCache": "hooks", "TeaCache": "hooks",
    "CacheSpec": "spec", "parse_cache_spec": "spec",
}  # fmt: skip
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    """Import on first use: the package is read at startup (``--cache`` checks), before torch is needed."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'diffstudio.cache' has no attribute {name!r}")
    return getattr(import_module(f"diffstudio.cache.{module}"), name)
