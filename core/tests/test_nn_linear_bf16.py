"""bf16 ``linear`` on CPUs without native bf16 computes in float32 (issue 27.2): torch's emulated bf16 GEMM is
hundreds of times slower than float32 there. Native-bf16 CPUs keep torch's bf16 kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffstudio.devices import CPU_BF16_ENV
from diffstudio.nn import DeltaLinear, linear
from torch.profiler import profile

GEMMS = ("mm", "addmm", "linear", "matmul", "bmm", "_linear_pointwise")


def _bf16_gemms(fn: object) -> list[str]:
    with profile(record_shapes=True) as prof:
        fn()  # type: ignore[operator]
    names = [e.name for e in prof.events() if "c10::BFloat16" in (e.input_dtypes or [])]
    return [n for n in names if n.split("::")[-1] in GEMMS]


def _operands() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=gen).to(torch.bfloat16)
    return x, torch.randn(8, 16, generator=gen).to(torch.bfloat16), torch.randn(8, generator=gen).to(torch.bfloat16)


def test_bf16_linear_on_emulated_cpu_runs_no_bf16_gemm_and_equals_float32_compute(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(CPU_BF16_ENV, "emulated")
    x, w, b = _operands()
    with torch.no_grad():
        assert _bf16_gemms(lambda: linear(x, w, b)) == []
        out = linear(x, w, b)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, F.linear(x.float(), w.float(), b.float()).to(torch.bfloat16), rtol=0, atol=0)


def test_bf16_delta_linear_trains_through_the_float32_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CPU_BF16_ENV, "emulated")
    layer = DeltaLinear(16, 8).to(torch.bfloat16)
    x, _, _ = _operands()
    layer(x).float().square().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.bfloat16


def test_linear_under_cpu_bf16_autocast_on_emulated_cpu_computes_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CPU_BF16_ENV, "emulated")
    x, w, b = (t.float() for t in _operands())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _bf16_gemms(lambda: linear(x, w, b)) == []
        out = linear(x, w, b)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_native_bf16_cpu_keeps_torch_bf16_gemm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CPU_BF16_ENV, "native")
    x, w, b = _operands()
    with torch.no_grad():
        assert _bf16_gemms(lambda: linear(x, w, b))
        assert torch.equal(linear(x, w, b), F.linear(x, w, b))
