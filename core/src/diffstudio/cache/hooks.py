"""The step caches: TeaCache and First-Block-Cache as :class:`~diffstudio.dit.extensions.StackHook` objects.

Both run inside the DiT's forward around the block stack (the ``stack_hook`` branch key) and receive the
:class:`~diffstudio.dit.stack.StackRun` of the call. One object is one CFG branch's state for one generation:
the ``step_cache`` unit makes a fresh one per branch in every generation, so the negative branch is never compared
with the positive one and nothing carries over between images.

TeaCache (ali-vilab/TeaCache, FLUX): ``m`` is the first double block's modulated image input ``(B, L, D)``; with
``r = mean|m - m_prev| / mean|m_prev|`` (a global mean), ``acc += f(r)`` (the rescale polynomial). The first and
the last step always compute and set ``acc = 0``; another step skips while ``acc < threshold`` and otherwise
computes and sets ``acc = 0``. ``m_prev`` is updated on every step. A computed step stores
``residual = out - img``; a skipped one returns ``img + residual`` (before the final layer). Threshold 0 never
skips. First-Block-Cache (diffusers' ``FirstBlockCacheConfig`` rule): the first double block always runs; its
image residual ``h = block(img) - img`` is compared with the one of the last computed step
(``mean|h - h_prev| / mean|h_prev|``); at or below the threshold the other blocks are skipped and
``block(img) + tail`` is returned, ``tail`` being the last computed step's ``out - block(img)``.

What a skipped step reuses contains everything that ran in the stack on the step it was computed: ControlNet /
InfiniteYou block residuals and other per-call hook contributions included (call hooks are not run on steps
TeaCache skips, see :func:`diffstudio.dit.extensions.call_extensions`). Inference only: a call with gradients
enabled is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diffstudio.cache.coefficients import Coefficients
from diffstudio.cache.errors import StepCacheError
from diffstudio.dit.stack import StackRun


def relative_l1(current: Tensor, previous: Tensor) -> float:
    """``mean|current - previous| / mean|previous|`` as a Python float (one host sync)."""
    return float(((current - previous).abs().mean() / previous.abs().mean()).cpu().item())


def _stack_run(run: Callable[[], Tensor], what: str) -> StackRun:
    if torch.is_grad_enabled():
        raise StepCacheError(
            f"{what} is inference-only and gradients are enabled; run under torch.no_grad() or drop the cache option"
        )
    if not isinstance(run, StackRun):
        raise StepCacheError(f"{what} needs a DiT whose forward passes a diffstudio.dit.stack.StackRun to stack_hook")
    return run


class StepCache:
    """What both caches share: the per-step record (``computed``) and the report.

    Attributes:
        threshold: The skip threshold (0 never skips).
        computed: One entry per call: True when the block stack ran.
        estimates: The estimator per call (None where none was taken).
    """

    kind = ""
    defers_call_hooks = False

    def __init__(self, threshold: float, branch: str = "positive") -> None:
        self.threshold = float(threshold)
        self.branch = branch
        self.computed: list[bool] = []
        self.estimates: list[float | None] = []

    def report(self) -> dict[str, Any]:
        """``{"kind", "threshold", "branch", "calls", "computed", "mask"}`` (mask: "1" computed, "0" skipped)."""
        return {"kind": self.kind, "threshold": self.threshold, "branch": self.branch, "calls": len(self.computed),
                "computed": sum(self.computed), "mask": "".join("1" if c else "0" for c in self.computed)}  # fmt: skip


class TeaCache(StepCache):
    """TeaCache for one CFG branch of one generation (a ``stack_hook``).

    Args:
        threshold: ``tea_cache_l1_thresh`` (0: compute every step).
        coefficients: The rescale polynomial fitted for this DiT.
        num_steps: Denoising steps of the generation (the last one always computes; the counter wraps after it).
        branch: The CFG branch, for reports.
    """

    kind = "teacache"
    defers_call_hooks = True

    def __init__(self, threshold: float, coefficients: Coefficients, num_steps: int, branch: str = "positive") -> None:
        super().__init__(threshold, branch)
        if num_steps < 1:
            raise StepCacheError(f"TeaCache needs at least one step, got num_steps={num_steps}")
        self.coefficients = coefficients
        self.num_steps = int(num_steps)
        self.step = 0
        self.accumulated = 0.0
        self.previous_modulated: Tensor | None = None
        self.previous_residual: Tensor | None = None

    def decide(self, modulated: Tensor) -> bool:
        """Take this step's modulated input ``(B, L, D)``, advance the step; True when the stack must run."""
        estimate: float | None = None
        edge = self.step == 0 or self.step == self.num_steps - 1
        previous = self.previous_modulated
        if edge or previous is None or previous.shape != modulated.shape:
            compute = True
            self.accumulated = 0.0
        else:
            estimate = relative_l1(modulated, previous)
            self.accumulated += self.coefficients(estimate)
            compute = not (self.threshold > 0 and self.accumulated < self.threshold)
            if compute:
                self.accumulated = 0.0
        self.previous_modulated = modulated
        self.estimates.append(estimate)
        self.step = (self.step + 1) % self.num_steps
        return compute

    def __call__(self, img: Tensor, vec: Tensor, run: Callable[[], Tensor]) -> Tensor:
        """The image tokens after the stack ``(B, L_img + L_ref, D)``: computed, or ``img + residual``."""
        stack = _stack_run(run, "TeaCache (tea_cache_l1_thresh)")
        compute = self.decide(stack.modulated_input())
        if compute or self.previous_residual is None or self.previous_residual.shape != img.shape:
            compute = True
            out = stack()
            self.previous_residual = out - img
        else:
            out = img + self.previous_residual
        self.computed.append(compute)
        return out


class FirstBlockCache(StepCache):
    """First-Block-Cache for one CFG branch of one generation (a ``stack_hook``; diffusers' rule).

    Args:
        threshold: Skip when the first block's residual changed by at most this (relative L1); 0 never skips.
        branch: The CFG branch, for reports.
    """

    kind = "fbcache"

    def __init__(self, threshold: float, branch: str = "positive") -> None:
        super().__init__(threshold, branch)
        self.head_residual: Tensor | None = None
        self.tail_residual: Tensor | None = None

    def __call__(self, img: Tensor, vec: Tensor, run: Callable[[], Tensor]) -> Tensor:
        """The image tokens after the stack ``(B, L_img + L_ref, D)``: computed, or ``block_0(img) + tail``."""
        stack = _stack_run(run, "First-Block-Cache (--cache fbcache)")
        if not stack.can_split:
            self.computed.append(True)
            self.estimates.append(None)
            return stack()
        head_img, head_txt = stack.first_block()
        residual = head_img - img
        previous, tail = self.head_residual, self.tail_residual
        estimate = None
        compute = previous is None or tail is None or previous.shape != residual.shape or tail.shape != img.shape
        if not compute:
            assert previous is not None
            estimate = relative_l1(residual, previous)
            compute = self.threshold <= 0 or estimate > self.threshold
        if compute:
            out = stack.rest(head_img, head_txt)
            self.head_residual = residual
            self.tail_residual = out - head_img
        else:
            assert tail is not None
            out = tail + head_img
        self.computed.append(compute)
        self.estimates.append(estimate)
        return out
