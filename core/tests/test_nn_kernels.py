"""diffstudio.nn's CPU kernel choices: oneDNN linear, the single-block concatenation, heads-first RoPE output."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from diffstudio.nn import DeltaLinear, apply_rope, linear, merge_heads_beside, rope_frequencies
from diffstudio.nn.linear import onednn_linear_available


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="this torch build has no oneDNN linear")


@needs_onednn
@pytest.mark.parametrize("shape", [(7, 64), (2, 9, 64), (2, 3, 5, 64)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_onednn_linear_equals_f_linear(shape: tuple[int, ...], with_bias: bool) -> None:
    x = torch.randn(shape, generator=_gen(1))
    w = torch.randn(48, 64, generator=_gen(2))
    b = torch.randn(48, generator=_gen(3)) if with_bias else None
    with torch.inference_mode():
        got = linear(x, w, b)
    assert got.shape == (*shape[:-1], 48)
    assert (got - F.linear(x, w, b)).abs().max().item() <= 1e-4


@needs_onednn
def test_onednn_runs_without_grad_and_f_linear_runs_with_it() -> None:
    x = torch.randn(4, 16, generator=_gen(4), requires_grad=True)
    w = torch.randn(8, 16, generator=_gen(5), requires_grad=True)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as inference, torch.no_grad():
        linear(x, w)
    assert any("_linear_pointwise" in e.name for e in inference.events())
    with profile(activities=[ProfilerActivity.CPU]) as training:
        y = linear(x, w)
    assert not any("_linear_pointwise" in e.name for e in training.events())
    y.sum().backward()
    assert x.grad is not None and w.grad is not None


def test_other_dtypes_and_one_dimensional_inputs_use_f_linear() -> None:
    w = torch.randn(8, 16, generator=_gen(6))
    with torch.no_grad():
        half = linear(torch.randn(3, 16, generator=_gen(7)).bfloat16(), w.bfloat16())
        vector = linear(torch.randn(16, generator=_gen(8)), w)
    assert half.dtype == torch.bfloat16 and vector.shape == (8,)


def test_delta_linear_uses_the_kernel_and_keeps_its_deltas() -> None:
    layer = DeltaLinear(16, 8)
    x = torch.randn(5, 16, generator=_gen(9))
    layer.add_delta("double", lambda t: t[..., :8] * 2)
    with torch.no_grad():
        got = layer(x)
    assert (got - (F.linear(x, layer.weight, layer.bias) + x[..., :8] * 2)).abs().max().item() <= 1e-5


def test_environment_switch_turns_onednn_off() -> None:
    code = "from diffstudio.nn.linear import onednn_linear_available as a; print(a())"
    env = {**os.environ, "DIFFSTUDIO_ONEDNN_LINEAR": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _swiglu(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.mul(F.silu(a), b, out=out) if out is not None else F.silu(a) * b


def test_merge_heads_beside_equals_the_concatenation() -> None:
    attn = torch.randn(2, 3, 6, 4, generator=_gen(10)).transpose(1, 2)  # (B, L=6, H=3, D=4), strided
    mlp = torch.randn(2, 6, 10, generator=_gen(11))
    expected = torch.cat((attn.reshape(2, 6, 12), _swiglu(mlp)), dim=-1)
    with torch.no_grad():
        got = merge_heads_beside(attn, mlp, _swiglu, 5)
    assert got.shape == (2, 6, 17) and got.is_contiguous() and torch.equal(got, expected)


def test_merge_heads_beside_keeps_gradients() -> None:
    attn = torch.randn(1, 4, 2, 3, generator=_gen(12), requires_grad=True)
    mlp = torch.randn(1, 4, 6, generator=_gen(13), requires_grad=True)
    merge_heads_beside(attn, mlp, _swiglu, 3).square().sum().backward()
    assert attn.grad is not None and mlp.grad is not None and attn.grad.abs().sum() > 0


def _rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)


@pytest.mark.parametrize("freq_batch", [1, 2])
def test_rope_output_is_heads_first_and_exact(freq_batch: int) -> None:
    x = torch.randn(2, 37, 4, 16, generator=_gen(14))
    ids = torch.randint(0, 50, (freq_batch, 37, 3), generator=_gen(15)).float()
    freqs = rope_frequencies(ids, (4, 6, 6), 10000.0)
    with torch.no_grad():
        got = apply_rope(x, freqs)
    assert got.shape == x.shape and got.transpose(-3, -2).is_contiguous()
    assert torch.equal(got, _rope_reference(x, freqs.cos, freqs.sin))
    assert apply_rope(x.bfloat16(), freqs).dtype == torch.bfloat16


def test_rope_under_autograd_keeps_the_input_layout_and_gradients() -> None:
    x = torch.randn(1, 5, 2, 8, generator=_gen(16), requires_grad=True)
    freqs = rope_frequencies(torch.arange(5.0)[None, :, None].expand(1, 5, 2), (4, 4), 100.0)
    out = apply_rope(x, freqs)
    assert out.is_contiguous()
    out.sum().backward()
    assert x.grad is not None
