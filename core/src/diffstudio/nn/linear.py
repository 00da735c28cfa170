"""``linear``: ``F.linear`` with the CPU GEMM that is fastest for inference.

On CPU, ``F.linear`` in float32 runs MKL's ``sgemm``. PyTorch also ships oneDNN, whose inner-product kernel is
what ``torch.compile`` uses for frozen CPU linears (``mkldnn::_linear_pointwise``). On the 2-core AMD EPYC
benchmark machine, float32, plain (not pre-packed) weights, it was faster at every shape a FLUX DiT uses::

    rows x in -> out         MKL GFLOP/s   oneDNN GFLOP/s
    1024 x 1024 -> 3072          168            211
    1024 x 1024 -> 6144          179            213
    1536 x 1024 -> 9216          167            193
    1536 x 4096 -> 1024          198            219
       1 x 1024 -> 6144      921 us/call    377 us/call

The op has no autograd formula, so :func:`linear` uses it only when no gradient can flow (under
``torch.no_grad()`` / ``torch.inference_mode()``, or when nothing involved requires grad), for float32 CPU
tensors of the plain tensor type; everything else, training included, goes to ``F.linear``. The results agree
with ``F.linear`` to float32 rounding (a different summation order: about 4e-6 relative).

On a CPU without native bf16 (no ``avx512_bf16`` / AMX-BF16: :func:`diffstudio.devices.cpu_compute_path`),
torch has no fast bf16 GEMM: measured on the AVX2 benchmark machine, a bf16 ``F.linear`` of 512 x 512 -> 512
took about 500x the float32 time. There :func:`linear` computes bf16 inputs in float32 (weights cast up per
call, the result cast back to bf16), and under a CPU bf16 autocast it computes in float32 with autocast off
(returning float32). Native-bf16 CPUs and CUDA keep torch's bf16 kernels.

The kernel choice does not depend on the memory policy, so resident and offloaded runs stay bitwise identical.
oneDNN keeps its own per-process workspace (JIT code, scratchpad): about 7 MiB more peak anonymous memory for
the FLUX.2 test model, whatever the policy. It is off when ``torch.backends.mkldnn`` is disabled or
unavailable, when the torch build lacks the op, and when ``DIFFSTUDIO_ONEDNN_LINEAR=0`` is set.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from diffstudio._env import switch_on
from diffstudio.devices import emulated_bf16

__all__ = ["linear", "onednn_linear_available"]


def _resolve_op() -> Callable[..., Tensor] | None:
    if not switch_on("DIFFSTUDIO_ONEDNN_LINEAR"):
        return None
    if not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return None
    try:
        op: Any = torch.ops.mkldnn._linear_pointwise
        # a private op: check once that this torch build takes this signature and computes F.linear
        x, w, b = torch.arange(6.0).reshape(2, 3), torch.arange(12.0).reshape(4, 3), torch.arange(4.0)
        if not torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b)):
            return None
    except (AttributeError, RuntimeError, TypeError):
        return None
    return op  # type: ignore[no-any-return]


_ONEDNN_LINEAR = _resolve_op()
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def onednn_linear_available() -> bool:
    """Whether :func:`linear` can use oneDNN at all in this process (build, flags and environment)."""
    return _ONEDNN_LINEAR is not None and bool(torch.backends.mkldnn.enabled)


def _plain_cpu_float32(tensor: Tensor) -> bool:
    return tensor.device.type == "cpu" and tensor.dtype == torch.float32 and type(tensor) in _PLAIN_TYPES


def _onednn_applies(input: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    if input.dim() < 2 or not _plain_cpu_float32(input) or not _plain_cpu_float32(weight):
        return False
    if bias is not None and not _plain_cpu_float32(bias):
        return False
    if torch.is_grad_enabled() and (
        input.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return False
    return bool(torch.backends.mkldnn.enabled)


def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``input @ weight.T + bias``: ``(..., in) x (out, in) -> (..., out)``, like ``F.linear``.

    oneDNN computes it where that is possible and no gradient is needed (module docstring); ``F.linear``
    otherwise.
    """
    if input.dtype == torch.bfloat16 and emulated_bf16(input.device, input.dtype):
        return _float32_linear(input, weight, bias).to(torch.bfloat16)
    if _cpu_bf16_autocast(input):
        with torch.autocast("cpu", enabled=False):
            return _float32_linear(input, weight, bias)
    if _ONEDNN_LINEAR is not None and _onednn_applies(input, weight, bias):
        return _ONEDNN_LINEAR(input, weight, bias, "none", [], "")
    return F.linear(input, weight, bias)


def _float32_linear(input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return linear(input.float(), weight.float(), None if bias is None else bias.float())


def _cpu_bf16_autocast(input: Tensor) -> bool:
    """A CPU bf16 autocast region on a CPU that only emulates bf16 (F.linear would run the slow bf16 GEMM)."""
    return (
        input.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and emulated_bf16(input.device, torch.bfloat16)
    )
