"""The ``step_cache`` unit: turns ``tea_cache_l1_thresh`` / ``step_cache`` into one cache per CFG branch.

Core's builtin ``diffstudio.cache.plugin`` adds it to every pipeline whose ``predict_velocity`` honours the
``stack_hook`` branch key (FLUX.1, FLUX.2). It runs once per branch in every generation's prepare stage, so
each branch gets a fresh state (reset per generation, never shared between the positive and negative branch).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from diffstudio.cache.coefficients import Coefficients, DitShape, resolve_coefficients
from diffstudio.cache.errors import CacheCoefficientsError, StepCacheError
from diffstudio.cache.hooks import FirstBlockCache, StepCache, TeaCache
from diffstudio.cache.spec import CacheSpec, check_threshold, parse_cache_spec
from diffstudio.pipeline.state import PipelineState
from diffstudio.pipeline.units import InputParam, OutputParam, PipelineUnit


def cache_spec(tea_cache_l1_thresh: Any, step_cache: Any) -> CacheSpec | None:
    """The setting a call asks for (None: no cache).

    Raises:
        StepCacheError: A bad value, or both arguments given.
    """
    spec = parse_cache_spec(step_cache, "step_cache")
    if tea_cache_l1_thresh is None:
        return spec
    threshold = check_threshold(tea_cache_l1_thresh, "tea_cache_l1_thresh")
    if spec is not None:
        raise StepCacheError(f"both tea_cache_l1_thresh={tea_cache_l1_thresh!r} and step_cache={step_cache!r} "
                             "were given; pass one of them")  # fmt: skip
    return CacheSpec("teacache", threshold)


def dit_shape(pipe: Any) -> DitShape:
    """The shape of ``pipe.dit`` that TeaCache coefficients are bound to."""
    dit = pipe.dit
    return DitShape(str(pipe.family), len(dit.double_blocks), len(dit.single_blocks), int(dit.hidden_size))


def make_cache(pipe: Any, spec: CacheSpec, num_steps: int, coefficients: Any = None) -> StepCache:
    """A fresh cache for one branch of one generation of ``pipe`` (TeaCache coefficients resolved for its DiT)."""
    if spec.kind == "fbcache":
        return FirstBlockCache(spec.threshold)
    loaded = getattr(pipe, "loaded", {}).get("dit")
    files = loaded.files if loaded is not None else ()
    try:
        fitted = resolve_coefficients(coefficients, dit_shape(pipe), files)
    except CacheCoefficientsError:
        if spec.threshold > 0:
            raise
        fitted = Coefficients((1.0, 0.0), None, "none (threshold 0 never skips)")
    return TeaCache(spec.threshold, fitted, num_steps)


class StepCacheUnit(PipelineUnit[Any]):
    """One TeaCache / First-Block-Cache state per CFG branch, written to the ``stack_hook`` branch key."""

    name = "step_cache"
    description = (
        "Step caching: tea_cache_l1_thresh (TeaCache) or step_cache='teacache:T'|'fbcache:T' makes one cache state per "
        "CFG branch (stack_hook); skipped steps reuse the last computed residual of the block stack."
    )
    per_branch = True
    inputs = (
        InputParam("tea_cache_l1_thresh", "TeaCache threshold (None: off; 0: computes every step; larger: faster)"),
        InputParam("step_cache", "'teacache:0.4' or 'fbcache:0.1' (the --cache syntax), or None"),
        InputParam("tea_cache_coefficients", "TeaCache polynomial: JSON file, list of numbers or 'flux1-dev'"),
        InputParam("timesteps", "(N,) the schedule (the last of its N steps always computes)"),
    )
    outputs = (OutputParam("stack_hook", "this branch's TeaCache / FirstBlockCache state", optional=True),)

    def process(self, pipe: Any, **inputs: Any) -> Mapping[str, Any]:
        """``{"stack_hook": cache}`` for this branch, or ``{}`` without a cache setting."""
        spec = cache_spec(inputs["tea_cache_l1_thresh"], inputs["step_cache"])
        if spec is None:
            return {}
        if torch.is_grad_enabled():
            raise StepCacheError(f"step caching ({spec}) is inference-only; gradients are enabled (training?)")
        timesteps = inputs["timesteps"]
        steps = len(timesteps) if timesteps is not None else 1
        return {"stack_hook": make_cache(pipe, spec, steps, inputs["tea_cache_coefficients"])}


def step_cache_unit(family: str) -> StepCacheUnit:
    """The unit for a family's pipeline, anchored after its ``<family>_set_timesteps`` unit."""
    cls = type(f"StepCacheUnit_{family}", (StepCacheUnit,), {"after": (f"{family}_set_timesteps",)})
    return cls()  # type: ignore[no-any-return]


def step_cache_report(state: PipelineState) -> dict[str, Any] | None:
    """What the caches of a finished generation did, or None when no cache ran.

    Returns:
        ``{"cache": "teacache:0.4", "steps": N, "computed_steps": n, "branches": {branch: report}}``;
        ``computed_steps`` counts the steps on which the positive branch ran the block stack.
    """
    branches = {}
    for name, values in (("positive", state.positive), ("negative", state.negative)):
        hook = values.get("stack_hook")
        if isinstance(hook, StepCache):
            hook.branch = name
            branches[name] = hook.report()
    if not branches:
        return None
    first = next(iter(branches.values()))
    return {"cache": f"{first['kind']}:{first['threshold']:g}", "steps": first["calls"],
            "computed_steps": first["computed"], "branches": branches}  # fmt: skip
