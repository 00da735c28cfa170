"""bf16 autoencoders on CPUs without native bf16 compute their convolutions in float32 (issue 27.2).

torch's emulated bf16 convolution (``aten::_slow_conv2d_forward``) is ~90x slower than float32 on an AVX2 CPU;
on such CPUs the LDM encoder/decoder run their activations in float32 on the bf16 weights and return bf16.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffstudio.devices import CPU_BF16_ENV
from diffstudio.nn.conv import Conv2d, GroupNorm
from diffstudio.nn.ldm import Decoder, Encoder
from torch import nn
from torch.profiler import profile

SIZES = {"ch": 8, "ch_mult": (1, 2), "num_res_blocks": 1, "z_channels": 4, "groups": 4}


def _perturbed(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return module


def _bf16_convolutions(fn: object) -> list[str]:
    """Names of the convolution kernels ``fn`` ran on bf16 tensors."""
    with profile(record_shapes=True) as prof:
        fn()  # type: ignore[operator]
    return [e.name for e in prof.events() if "conv" in e.name and "c10::BFloat16" in (e.input_dtypes or [])]


@pytest.fixture
def emulated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CPU_BF16_ENV, "emulated")


def test_bf16_decoder_on_emulated_cpu_runs_no_bf16_convolution_and_returns_bf16(emulated: None) -> None:
    decoder = _perturbed(Decoder(out_channels=3, post_quant_conv=True, **SIZES)).to(torch.bfloat16)
    encoder = _perturbed(Encoder(in_channels=3, quant_conv=True, **SIZES)).to(torch.bfloat16)
    z = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        slow = _bf16_convolutions(lambda: (decoder(z), encoder(torch.randn(1, 3, 16, 16, dtype=torch.bfloat16))))
        assert decoder(z).dtype == torch.bfloat16 and encoder(decoder(z)).dtype == torch.bfloat16
    assert slow == []
    assert all(p.dtype == torch.bfloat16 for p in decoder.parameters())  # storage untouched


def test_bf16_decoder_on_emulated_cpu_equals_float32_compute_on_the_bf16_weights(emulated: None) -> None:
    decoder = _perturbed(Decoder(out_channels=3, post_quant_conv=True, **SIZES)).to(torch.bfloat16)
    reference = copy.deepcopy(decoder).float()  # the same (bf16-rounded) weights, float32 everywhere
    z = torch.randn(2, 4, 8, 6).to(torch.bfloat16)
    with torch.no_grad():
        out = decoder(z)
        expected = reference(z.float()).to(torch.bfloat16)
    assert torch.equal(out, expected)


def test_emulated_float32_compute_stays_within_bf16_tolerance_of_native_bf16_compute(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decoder = _perturbed(Decoder(out_channels=3, post_quant_conv=True, **SIZES)).to(torch.bfloat16)
    z = torch.randn(1, 4, 8, 8).to(torch.bfloat16)
    with torch.no_grad():
        monkeypatch.setenv(CPU_BF16_ENV, "native")  # torch's own bf16 kernels
        native = decoder(z).float()
        monkeypatch.setenv(CPU_BF16_ENV, "emulated")
        upcast = decoder(z).float()
    scale = native.abs().max()
    assert (upcast - native).abs().max() <= 2e-2 * scale  # bf16 rounding of a few layers, not a different model
    assert not torch.equal(upcast, native)  # the two paths really differ (the test can tell them apart)


def test_native_bf16_path_keeps_torch_bf16_convolutions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CPU_BF16_ENV, "native")
    conv = Conv2d(4, 6, kernel_size=3, padding=1).to(torch.bfloat16)
    with torch.no_grad():
        assert _bf16_convolutions(lambda: conv(torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)))


def test_conv_under_cpu_bf16_autocast_on_emulated_cpu_computes_in_float32(emulated: None) -> None:
    conv = Conv2d(4, 6, kernel_size=3, padding=1)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        slow = _bf16_convolutions(lambda: conv(x))
        out = conv(x)
    assert slow == [] and out.dtype == torch.float32
    torch.testing.assert_close(out, nn.functional.conv2d(x, conv.weight, conv.bias, padding=1), rtol=1e-5, atol=1e-5)


def test_float32_layers_are_plain_torch_layers() -> None:
    conv, norm = Conv2d(4, 6, kernel_size=3, padding=1), GroupNorm(2, 4)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(conv(x), nn.functional.conv2d(x, conv.weight, conv.bias, padding=1))
        assert torch.equal(norm(x), nn.functional.group_norm(x, 2, norm.weight, norm.bias, norm.eps))
    assert isinstance(conv, nn.Conv2d) and isinstance(norm, nn.GroupNorm)
