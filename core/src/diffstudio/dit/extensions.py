"""The DiT call contract: extension inputs of one denoiser call, per-call hooks and how their results merge.

Both FLUX families' ``predict_velocity`` read the same branch keys (:data:`BRANCH_KEYS`, plus ``call_hooks`` and
``dit_deltas``) and hand them to the DiT forward; adapters write those keys and import no family. A model that
runs beside the DiT on every call (ControlNet, InfiniteYou) writes a named :class:`CallHook` into the branch key
``call_hooks`` (``{name: hook}``); the family calls every hook with a :class:`DitCall` (the call's actual inputs,
step index, timestep and branch) just before the forward and merges what the hooks return
(:func:`run_call_hooks`, :func:`merge_extensions`). The trainer calls ``predict_velocity`` too, so a hooked model
that is trainable receives gradients. After the trainer collates samples prepared one at a time, ``call_hooks``
is a list with one mapping per sample; each sample's hooks then see that sample's slice and may return only
``block_residual``.

Merging: residuals are summed, ``attention_kwargs`` / ``kv_extension`` entries are united (an entry set twice is
an error), extra text / image tokens are concatenated along tokens, ``img_cond`` along channels. ``text_stream``
and ``stack_hook`` *replace* something, so two sources of one of them are an :class:`ExtensionConflictError`
naming both.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch
from torch import Tensor

from diffstudio.errors import DiffstudioError
from diffstudio.nn import BlockKind

BRANCH_KEYS: tuple[str, ...] = (
    "extra_txt", "extra_txt_ids", "extra_img", "extra_img_ids", "img_cond", "kv_extension", "block_residual",
    "attention_kwargs", "stack_hook", "text_stream",
)  # fmt: skip
"""Branch keys that ``predict_velocity`` hands to the DiT forward (see the package docstring for each)."""

HOOK_KEYS: frozenset[str] = frozenset(BRANCH_KEYS)
"""What a :class:`CallHook` may return."""

EXTENSION_INPUTS: frozenset[str] = frozenset({*BRANCH_KEYS, "call_hooks", "dit_deltas"})
"""Every extension key of the contract (a family lists those it honours in ``extension_inputs``)."""

DEPRECATED_KEYS: Mapping[str, str] = {"extra_ctx": "extra_txt", "extra_ctx_ids": "extra_txt_ids"}
"""Old FLUX.2 branch keys -> shared names (read with a DeprecationWarning for one release)."""

_REPLACING = ("text_stream", "stack_hook")


class ExtensionConflictError(DiffstudioError, ValueError):
    """Two extension sources set the same replacing point (``text_stream``, ``stack_hook``) or entry."""


@dataclass(frozen=True)
class DitCall:
    """The inputs of one DiT call (one CFG branch, one step), in the family's own token layout.

    Attributes:
        img: Noisy target-image tokens ``(B, L_img, C)``.
        img_ids: Their ids ``(B, L_img, A)`` (A = 3 for FLUX.1, 4 for FLUX.2).
        txt: Text tokens of the branch ``(B or 1, L_txt, C_txt)`` (without extra text tokens).
        txt_ids: Their ids ``(B or 1, L_txt, A)``.
        timesteps: Flow-matching times in ``[0, 1]``, ``(B,)``.
        y: Pooled text vector ``(B or 1, C_y)``, or None for families without one (FLUX.2).
        guidance: Embedded guidance ``(B,)`` or None.
        step_index: Denoising step (0 in training).
        branch: ``"positive"`` or ``"negative"`` (CFG branch of this call).
    """

    img: Tensor
    img_ids: Tensor
    txt: Tensor
    txt_ids: Tensor
    timesteps: Tensor
    y: Tensor | None
    guidance: Tensor | None
    step_index: int
    branch: str = "positive"


@dataclass(frozen=True)
class TextStream:
    """A replacement of the call's text stream (Step1X's timestep-conditioned connector, Nexus-Gen).

    Attributes:
        txt: Text tokens ``(B or 1, L, C_txt)`` that replace the branch's.
        txt_ids: Their ids ``(B or 1, L, A)``.
        y: Pooled vector that replaces the branch's (None keeps it; FLUX.2 has none).
    """

    txt: Tensor
    txt_ids: Tensor
    y: Tensor | None = None


class CallHook(Protocol):
    """``hook(call) -> extension inputs``: any of :data:`HOOK_KEYS` (an empty mapping adds nothing)."""

    def __call__(self, call: DitCall) -> Mapping[str, Any]:
        """Return the extension inputs for this call."""
        ...


class BlockResidualHook(Protocol):
    """Called after every block: ``hook(kind, index, img) -> residual or None``.

    ``img`` is the target-image tokens ``(B, L_img, D)`` after block ``index`` of ``kind`` (``"double"`` or
    ``"single"``); a returned tensor of the same shape is added to them (ControlNet / InfiniteYou residuals).
    """

    def __call__(self, kind: BlockKind, index: int, img: Tensor) -> Tensor | None:
        """Return a residual ``(B, L_img, D)`` for the target-image tokens, or None."""
        ...


class StackHook(Protocol):
    """Wraps the whole block stack: ``hook(img, vec, run) -> img_out`` (step caching, TeaCache-style skipping).

    ``img`` is the embedded image tokens ``(B, L_img + L_ref, D)`` before the first block, ``vec`` the
    conditioning vector ``(B, D)``, and ``run()`` runs every block and returns the image tokens after the last
    one (same shape). A hook may call ``run()`` or skip it and return e.g. ``img + cached_residual``. State per
    CFG branch: set one hook per branch (the key is per-branch) or key the state on :attr:`DitCall.branch` in a
    call hook that returns ``stack_hook``.
    """

    def __call__(self, img: Tensor, vec: Tensor, run: Callable[[], Tensor]) -> Tensor:
        """Return the image tokens after the stack, ``(B, L_img + L_ref, D)``."""
        ...


class SummedResidual:
    """Several ``block_residual`` hooks as one: the residuals they return are summed (None ones skipped)."""

    def __init__(self, *hooks: Any) -> None:
        self.hooks = [h for h in hooks if h is not None]

    def __call__(self, kind: BlockKind, index: int, img: Tensor) -> Tensor | None:
        """Sum of the hooks' residuals ``(B, L_img, D)`` for this block, or None when none returns one."""
        total: Tensor | None = None
        for hook in self.hooks:
            residual = hook(kind, index, img)
            if residual is not None:
                total = residual if total is None else total + residual
        return total


class BatchedResidual:
    """Per-sample ``block_residual`` hooks as one: sample ``i``'s hook sees ``img[i:i+1]``; results are stacked."""

    def __init__(self, hooks: list[Any]) -> None:
        self.hooks = hooks

    def __call__(self, kind: BlockKind, index: int, img: Tensor) -> Tensor | None:
        """``(B, L_img, D)`` residual (zeros for samples whose hook returns None), or None when none returns one."""
        parts = [None if h is None else h(kind, index, img[i : i + 1]) for i, h in enumerate(self.hooks)]
        if all(p is None for p in parts):
            return None
        return torch.cat([torch.zeros_like(img[i : i + 1]) if p is None else p for i, p in enumerate(parts)], dim=0)


class CombinedDelta:
    """A combiner over separate LoRA outputs at one Linear (LoRA-Fusion): ``combine(x, [path(x), ...])``.

    Put it in ``dit_deltas`` under the Linear's path instead of one side path per LoRA; the default combiner
    sums (what separate side paths would do).

    Args:
        paths: The side paths ``fn(x) -> (..., out_features)``.
        combine: ``combine(x, outputs) -> (..., out_features)``; None sums the outputs.
    """

    def __init__(
        self,
        paths: Sequence[Callable[[Tensor], Tensor]],
        combine: Callable[[Tensor, list[Tensor]], Tensor] | None = None,
    ) -> None:
        self.paths = list(paths)
        self.combine = combine

    def __call__(self, x: Tensor) -> Tensor:
        """The combined delta for input ``x (..., in_features)``."""
        outputs = [path(x) for path in self.paths]
        if self.combine is not None:
            return self.combine(x, outputs)
        total = outputs[0]
        for out in outputs[1:]:
            total = total + out
        return total


def branch_of(inputs: Mapping[str, Any]) -> str:
    """The CFG branch of a branch view (the pipeline state's views carry it under ``branch``; default positive)."""
    value = inputs.get("branch")
    return value if value in ("positive", "negative") else "positive"


def branch_extensions(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`BRANCH_KEYS` a branch view sets (not None); deprecated names are read with a warning."""
    out = {key: inputs[key] for key in BRANCH_KEYS if inputs.get(key) is not None}
    for old, new in DEPRECATED_KEYS.items():
        if inputs.get(old) is None:
            continue
        warnings.warn(f"branch key {old!r} is deprecated; write {new!r} (the shared DiT extension name)",
                      DeprecationWarning, stacklevel=3)  # fmt: skip
        if new in out:
            raise ExtensionConflictError(f"branch inputs set both {old!r} and {new!r}; write only {new!r}")
        out[new] = inputs[old]
    return out


def call_extensions(inputs: Mapping[str, Any], call: Callable[[], DitCall]) -> dict[str, Any]:
    """The branch's extension inputs with its ``call_hooks`` run and merged (``call()`` is built only for hooks).

    Raises:
        ExtensionConflictError: Two sources conflict (see :func:`merge_extensions`).
    """
    extensions = branch_extensions(inputs)
    hooks = inputs.get("call_hooks")
    if hooks and getattr(extensions.get("stack_hook"), "defers_call_hooks", False):
        return defer_call_hooks(hooks, call, extensions)  # a step cache may skip the stack: run them inside it
    if hooks:
        extensions = run_call_hooks(hooks, call(), extensions)
    return extensions


def _cat_tokens(name: str, current: Any, value: Any, dim: int) -> Tensor:
    if current is None:
        return value  # type: ignore[no-any-return]
    batch = max(current.shape[0], value.shape[0])
    first, second = current.expand(batch, *current.shape[1:]), value.to(current.device, current.dtype)
    return torch.cat([first, second.expand(batch, *value.shape[1:])], dim=dim)


def merge_extensions(
    base: Mapping[str, Any],
    extra: Mapping[str, Any],
    source: str = "a call hook",
    owners: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Merge a hook's extension inputs into the forward's (rules in the module docstring).

    Args:
        base: The extension inputs so far.
        extra: What one source (a hook) returns.
        source: The source's name, for errors.
        owners: Who set each replacing point so far (updated in place); unknown owners read as "branch inputs".

    Raises:
        ExtensionConflictError: An unknown key, an entry set twice, two sources replacing the same stream, or
            extra tokens merged where only one side has ids.
    """
    out = dict(base)
    owners = {} if owners is None else owners
    for key, value in extra.items():
        if value is None:
            continue
        current = out.get(key)
        if key not in HOOK_KEYS:
            raise ExtensionConflictError(
                f"{source} returned {key!r}; a call hook may return {', '.join(sorted(HOOK_KEYS))}"
            )
        if current is None:
            out[key] = value
        elif key in _REPLACING:
            first = owners.get(key, "the branch inputs")
            raise ExtensionConflictError(
                f"{first} and {source} both set {key!r}; only one extension may replace it (drop one of them)"
            )
        elif key == "block_residual":
            out[key] = SummedResidual(current, value)
        elif key in ("attention_kwargs", "kv_extension"):
            clash = sorted(set(current) & set(value))
            if clash:
                raise ExtensionConflictError(f"{source} sets {key} entries {clash} that are already set; set each once")
            out[key] = {**current, **value}
        elif key in ("extra_txt", "extra_img"):
            ids = f"{key}_ids"
            if (base.get(ids) is None) != (extra.get(ids) is None):
                raise ExtensionConflictError(
                    f"{source} adds {key} where only one side has {ids}; pass {ids} with both or neither"
                )
            out[key] = _cat_tokens(key, current, value, 1)
        elif key in ("extra_txt_ids", "extra_img_ids"):
            out[key] = _cat_tokens(key, current, value, 1)
        elif key == "img_cond":
            out[key] = _cat_tokens(key, current, value, -1)
        owners.setdefault(key, source)
    return out


def _sample(call: DitCall, i: int) -> DitCall:
    batch = call.img.shape[0]
    values = {}
    for f in fields(call):
        value = getattr(call, f.name)
        is_batched = isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == batch
        values[f.name] = value[i : i + 1] if is_batched else value
    return DitCall(**values)


def run_call_hooks(
    hooks: Mapping[str, CallHook] | list[Mapping[str, CallHook]], call: DitCall, extensions: Mapping[str, Any]
) -> dict[str, Any]:
    """Call the hooks (one mapping, or one mapping per sample after collation) and merge their results.

    Raises:
        ExtensionConflictError: Two sources conflict (see :func:`merge_extensions`).
        ValueError: Per-sample hooks returned something other than ``block_residual``, or their count is not the
            batch size.
    """
    out = dict(extensions)
    owners: dict[str, str] = {}
    if isinstance(hooks, Mapping):
        for name, hook in hooks.items():
            out = merge_extensions(out, hook(call), f"call hook {name!r}", owners)
        return out
    if len(hooks) != call.img.shape[0]:
        raise ValueError(f"{len(hooks)} per-sample call_hooks for a batch of {call.img.shape[0]}")
    residuals: list[Any] = []
    for i, sample_hooks in enumerate(hooks):
        merged = run_call_hooks(sample_hooks, _sample(call, i), {})
        other = sorted(set(merged) - {"block_residual"})
        if other:
            raise ValueError(f"per-sample call hooks may only return block_residual, got {other}")
        residuals.append(merged.get("block_residual"))
    return merge_extensions(out, {"block_residual": BatchedResidual(residuals)}, "per-sample call hooks", owners)


def append_tokens(
    tokens: Tensor | None, ids: Tensor | None, more: Tensor | None, more_ids: Tensor | None
) -> tuple[Tensor | None, Tensor | None]:
    """Append extra tokens and ids ``(B|1, L, C)`` / ``(B|1, L, A)`` after the family's own (e.g. Kontext)."""
    if more is None:
        return tokens, ids
    if tokens is None:
        return more, more_ids
    if ids is None or more_ids is None:
        raise ExtensionConflictError("extra_img needs extra_img_ids (the family's reference tokens have ids)")
    return _cat_tokens("extra_img", tokens, more, 1), _cat_tokens("extra_img_ids", ids, more_ids, 1)


class DeferredCallHooks:
    """Call hooks run when the block stack first needs them: a ``block_residual`` that calls them on first use.

    A step cache whose ``stack_hook`` has ``defers_call_hooks = True`` (TeaCache) skips the whole stack on some
    steps; the hooks (ControlNet, InfiniteYou) then never run on those steps. A deferred hook may return only
    ``block_residual``; a hook that must run before the forward sets ``deferrable = False``.
    """

    def __init__(self, hooks: Mapping[str, CallHook] | list[Mapping[str, CallHook]], call: Callable[[], DitCall]):
        self.hooks, self.call = hooks, call
        self.ran = False
        self.residual: BlockResidualHook | None = None

    def __call__(self, kind: BlockKind, index: int, img: Tensor) -> Tensor | None:
        """Run the hooks on the first call; the residual ``(B, L_img, D)`` their results give for this block."""
        if not self.ran:
            merged = run_call_hooks(self.hooks, self.call(), {})
            other = sorted(set(merged) - {"block_residual"})
            if other:
                raise ExtensionConflictError(
                    f"call hooks returned {other} under a step cache that defers them (stack_hook); a deferred hook "
                    f"may return only block_residual: set deferrable = False on the hook, or run without the cache"
                )
            self.residual, self.ran = merged.get("block_residual"), True
        return None if self.residual is None else self.residual(kind, index, img)


def defer_call_hooks(
    hooks: Mapping[str, CallHook] | list[Mapping[str, CallHook]], call: Callable[[], DitCall],
    extensions: Mapping[str, Any],
) -> dict[str, Any]:
    """Run the hooks marked ``deferrable = False`` now; merge the others as one :class:`DeferredCallHooks`."""
    deferred: Any = hooks
    out = dict(extensions)
    if isinstance(hooks, Mapping):
        eager = {name: hook for name, hook in hooks.items() if getattr(hook, "deferrable", True) is False}
        deferred = {name: hook for name, hook in hooks.items() if name not in eager}
        if eager:
            out = run_call_hooks(eager, call(), out)
        if not deferred:
            return out
    return merge_extensions(out, {"block_residual": DeferredCallHooks(deferred, call)}, "deferred call hooks")
