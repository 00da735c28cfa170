"""Flex.2's conditioning channels, as tensors: packing, the control stop, and the per-call hook.

Flex.2 reads 196 channels per token. At the unpacked latent grid (``(H/8, W/8)`` for the official VAE) the
input is the channel concatenation, in this order,

| channels | packed (x 4) | content |
|---|---|---|
| 0-15 | 0-63 | the noisy latents (the pipeline's own tokens) |
| 16-31 | 64-127 | inpaint latent ``VAE(image) * (1 - mask)``; zeros without inpainting |
| 32 | 128-131 | the mask, 1 = repaint; ones without inpainting |
| 33-48 | 132-195 | control latent ``VAE(control) * strength``; zeros without control and after the stop step |

Packing (2 x 2 patches, channel-major within a patch) acts on each channel separately, so packing the
concatenation equals concatenating the packed parts: the pipeline hands the DiT the 132 conditioning channels
as ``img_cond (1, L, 132)``, which the FLUX.1 DiT concatenates after its 64 latent channels before ``img_in``.

The control stops after step ``k = int(stop * (N - 1))`` of an ``N``-step schedule: DiffSynth's rule "use it
while ``timestep >= timesteps[k]``", which for a strictly decreasing schedule is "steps ``0 .. k``".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffstudio.dit.extensions import DitCall
from torch import Tensor

__all__ = ["FlexControlHook", "condition_channels", "control_last_step", "pack", "unpack"]


def pack(z: Tensor) -> Tensor:
    """Latent image to FLUX.1 tokens: ``(B, C, 2h, 2w) -> (B, h * w, 4 C)`` (2 x 2 patches, channel-major)."""
    b, c, hh, ww = z.shape
    patches = z.reshape(b, c, hh // 2, 2, ww // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, 2, 2)
    return patches.reshape(b, (hh // 2) * (ww // 2), c * 4)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """FLUX.1 tokens back to a latent image: ``(B, h * w, 4 C) -> (B, C, 2h, 2w)`` (inverse of :func:`pack`)."""
    b, _, channels = tokens.shape
    c = channels // 4
    return tokens.reshape(b, h, w, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, 2 * h, 2 * w)


def condition_channels(
    grid: tuple[int, int],
    latent_channels: int,
    *,
    inpaint: Tensor | None = None,
    mask: Tensor | None = None,
    control: Tensor | None = None,
    strength: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """The packed conditioning with and without the control: two ``(1, h * w, 4 (2 C + 1 + C))`` tensors.

    Args:
        grid: The unpacked latent grid ``(2h, 2w)``.
        latent_channels: ``C`` (16).
        inpaint: Clean latents of the image to inpaint ``(1, C, 2h, 2w)``; None: zeros.
        mask: Repaint weights ``(1, 1, 2h, 2w)`` in ``[0, 1]``, 1 = repaint; None: ones.
        control: Latents of the control image ``(1, C, 2h, 2w)``; None: zeros.
        strength: Factor on the control latents.

    Returns:
        ``(with_control, without_control)``; they differ only in the last ``4 C`` channels.
    """
    reference = next((t for t in (inpaint, mask, control) if t is not None), None)
    kwargs: dict[str, Any] = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
    zeros = torch.zeros(1, latent_channels, *grid, **kwargs)
    mask = torch.ones(1, 1, *grid, **kwargs) if mask is None else mask
    known = (zeros if inpaint is None else inpaint) * (1 - mask)
    base = pack(torch.cat([known, mask], dim=1))  # (1, L, 4 (C + 1))
    controlled = zeros if control is None else control * strength
    return torch.cat([base, pack(controlled)], dim=-1), torch.cat([base, pack(zeros)], dim=-1)


def control_last_step(stop: float, num_steps: int) -> int:
    """Index of the last step that sees the control: ``int(stop * (num_steps - 1))``."""
    return int(stop * (num_steps - 1))


class FlexControlHook:
    """A call hook (``call_hooks["flex"]``) that hands the DiT the conditioning with the control until a step.

    Args:
        with_control: ``img_cond`` for steps ``0 .. last_step``, ``(1, L, 132)``.
        without_control: ``img_cond`` for later steps (control channels zero), ``(1, L, 132)``.
        last_step: Last step index that sees the control (:func:`control_last_step`).
    """

    def __init__(self, with_control: Tensor, without_control: Tensor, last_step: int) -> None:
        self.with_control = with_control
        self.without_control = without_control
        self.last_step = last_step

    def __call__(self, call: DitCall) -> Mapping[str, Any]:
        """``{"img_cond": (1, L, 132)}`` for this call's step."""
        return {"img_cond": self.with_control if call.step_index <= self.last_step else self.without_control}
