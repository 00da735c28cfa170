"""Per-call extension hooks: adapters that need the DiT's actual inputs of one call (ControlNet-style models).

Most adapters build their extension inputs once per generation in a unit (extra tokens, K/V, masks). A model
that runs *beside* the DiT on every call, on the same noisy latents and timestep (a ControlNet, InfiniteYou's
InfuseNet), cannot: it must see what the DiT sees. Such an adapter writes a named :class:`CallHook` into the
branch key ``call_hooks`` (a mapping ``name -> hook``); :meth:`FluxImagePipeline.predict_velocity` calls every
hook with a :class:`DitCall` just before the DiT forward and merges what the hooks return into the forward's
extension arguments (:func:`merge_extensions`). The trainer calls ``predict_velocity`` too, so a hooked model
that is trainable receives gradients.

A unit that adds a hook reads the existing ``call_hooks`` and writes a new mapping with its entry added. When
the trainer collates samples prepared one at a time, ``call_hooks`` becomes a list with one mapping per sample;
:func:`run_call_hooks` then calls each sample's hooks on that sample's slice of the call and stacks the
residuals they return along the batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Protocol

from diffstudio.nn import BlockKind
from torch import Tensor


@dataclass(frozen=True)
class DitCall:
    """The inputs of one DiT call (one CFG branch, one step).

    Attributes:
        img: Noisy target-image tokens ``(B, L_img, 64)``.
        img_ids: Their ids ``(B, L_img, 3)``.
        txt: T5 tokens of the branch ``(B or 1, L_txt, 4096)`` (without extra text tokens).
        txt_ids: Their ids ``(B or 1, L_txt, 3)``.
        timesteps: Flow-matching times in ``[0, 1]``, ``(B,)``.
        y: Pooled CLIP vector ``(B or 1, 768)``.
        guidance: Embedded guidance ``(B,)`` or None.
        step_index: Denoising step (0 in training).
    """

    img: Tensor
    img_ids: Tensor
    txt: Tensor
    txt_ids: Tensor
    timesteps: Tensor
    y: Tensor
    guidance: Tensor | None
    step_index: int


class CallHook(Protocol):
    """``hook(call) -> extension inputs``.

    The mapping holds any of ``block_residual``, ``attention_kwargs``, ``kv_extension``, ``extra_txt`` (the DiT
    forward's keyword names).
    """

    def __call__(self, call: DitCall) -> Mapping[str, Any]:
        """Return the extension inputs for this call (an empty mapping adds nothing)."""
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


def merge_extensions(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Merge a hook's extension inputs into the forward's.

    ``block_residual`` hooks are summed, ``attention_kwargs`` and ``kv_extension`` are merged as mappings
    (the same key from both sides is an error), ``extra_txt`` tokens are concatenated along tokens.

    Raises:
        ValueError: An unknown key, or a key of ``attention_kwargs`` / ``kv_extension`` set twice.
    """
    out = dict(base)
    for key, value in extra.items():
        if value is None:
            continue
        current = out.get(key)
        if key == "block_residual":
            out[key] = value if current is None else SummedResidual(current, value)
        elif key in ("attention_kwargs", "kv_extension"):
            clash = sorted(set(current or {}) & set(value))
            if clash:
                raise ValueError(f"two extensions set {key} entries {clash}; each entry may be set once")
            out[key] = {**(current or {}), **value}
        elif key == "extra_txt":
            import torch

            out[key] = value if current is None else torch.cat([current, value.to(current.dtype)], dim=1)
        else:
            raise ValueError(
                f"a call hook returned {key!r}; hooks may return block_residual, attention_kwargs, kv_extension, "
                "extra_txt"
            )
    return out


class BatchedResidual:
    """Per-sample ``block_residual`` hooks as one: sample ``i``'s hook sees ``img[i:i+1]``; results are stacked."""

    def __init__(self, hooks: list[Any]) -> None:
        self.hooks = hooks

    def __call__(self, kind: BlockKind, index: int, img: Tensor) -> Tensor | None:
        """``(B, L_img, D)`` residual (zeros for samples whose hook returns None), or None when none returns one."""
        import torch

        parts = [None if h is None else h(kind, index, img[i : i + 1]) for i, h in enumerate(self.hooks)]
        if all(p is None for p in parts):
            return None
        return torch.cat([torch.zeros_like(img[i : i + 1]) if p is None else p for i, p in enumerate(parts)], dim=0)


def _sample(call: DitCall, i: int) -> DitCall:
    batch = call.img.shape[0]
    values = {}
    for f in fields(call):
        value = getattr(call, f.name)
        is_batched = isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == batch
        values[f.name] = value[i : i + 1] if is_batched else value
    return DitCall(**values)


def run_call_hooks(hooks: Mapping[str, CallHook] | list[Mapping[str, CallHook]], call: DitCall,
                   extensions: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Call the hooks (one mapping, or one mapping per sample after collation) and merge their results.

    Raises:
        ValueError: Per-sample hooks returned something other than ``block_residual``, or their count is not the
            batch size.
    """
    out = dict(extensions)
    if isinstance(hooks, Mapping):
        for hook in hooks.values():
            out = merge_extensions(out, hook(call))
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
    return merge_extensions(out, {"block_residual": BatchedResidual(residuals)})
