"""Convolution and GroupNorm that avoid emulated bfloat16 on CPUs without native bf16.

On CPUs without native bf16 (no ``avx512_bf16`` / AMX-BF16, see :func:`diffstudio.devices.cpu_compute_path`)
oneDNN has no bf16 convolution, and torch falls back to its generic ``_slow_conv2d_forward``: measured on an
AVX2 machine, a bf16 3x3 convolution is about 90x slower than the float32 one. Two things avoid it:

- :class:`Conv2d` computes a bf16 convolution in float32 there (also under a CPU bf16 autocast, which would
  otherwise cast its inputs down), returning bf16;
- float32 activations may meet bf16 parameters: :class:`Conv2d` and :class:`GroupNorm` then compute in float32
  with the parameters cast up. This lets a whole autoencoder stack run its activations in float32 on bf16
  weights (:func:`float32_activations`), casting once at entry and exit instead of around every convolution.

Everywhere else (float32 weights, CUDA, native-bf16 CPUs) both are exactly their torch counterparts: same
parameters, same state-dict keys, same ``isinstance``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffstudio.devices import emulated_bf16

__all__ = ["Conv2d", "GroupNorm", "float32_activations"]


def float32_activations(x: Tensor) -> bool:
    """True when a stack of :class:`Conv2d` / :class:`GroupNorm` should run ``x`` in float32 (bf16 emulated)."""
    return x.dtype == torch.bfloat16 and emulated_bf16(x.device, x.dtype)


def _autocast_bf16_emulated(x: Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and emulated_bf16(x.device, torch.bfloat16)
    )


class Conv2d(nn.Conv2d):
    """:class:`torch.nn.Conv2d` that computes in float32 where bf16 would be emulated (see the module docstring).

    Shapes as :class:`torch.nn.Conv2d`: ``(B, C_in, H, W) -> (B, C_out, H', W')``; the output has the input's
    dtype (float32 in an emulated-bf16 autocast region).
    """

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # noqa: A002 (torch name)
        upcast = float32_activations(input) or (input.dtype == torch.float32 and weight.dtype == torch.bfloat16)
        if upcast or _autocast_bf16_emulated(input):
            with torch.autocast("cpu", enabled=False):
                fp32_bias = None if bias is None else bias.float()
                out: Tensor = super()._conv_forward(input.float(), weight.float(), fp32_bias)
            return out if _autocast_bf16_emulated(input) else out.to(input.dtype)
        out = super()._conv_forward(input, weight, bias)
        return out


class GroupNorm(nn.GroupNorm):
    """:class:`torch.nn.GroupNorm` that normalises float32 inputs with bf16 affine parameters cast up."""

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 (torch name)
        """``(B, C, *) -> (B, C, *)`` in the input's dtype."""
        if self.affine and input.dtype == torch.float32 and self.weight.dtype != torch.float32:
            return nn.functional.group_norm(input, self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        out: Tensor = super().forward(input)
        return out
