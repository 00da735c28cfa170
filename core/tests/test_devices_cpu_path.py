"""Which CPU bf16 path runs (native via avx512_bf16 / AMX-BF16, else emulated) and the default dtype it implies."""

from __future__ import annotations

import pytest
import torch
from diffstudio import devices
from diffstudio.devices import (
    CPU_BF16_ENV,
    classify_cpu_flags,
    compute_line,
    compute_record,
    cpu_compute_path,
    default_compute_dtype,
    emulated_bf16,
)
from diffstudio.run_models import torch_dtype_for


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16", "AMX_BF16"])
def test_avx512_bf16_or_amx_flags_mean_native_bf16_and_a_bf16_default(flag: str) -> None:
    path = classify_cpu_flags({"avx2", "avx512f", flag}, source="/proc/cpuinfo")
    assert path.native_bf16 and path.path == "native-bf16" and path.default_dtype == "bfloat16"
    assert flag.lower() in path.reason and "/proc/cpuinfo" in path.reason


def test_avx2_only_means_emulated_bf16_and_a_float32_default() -> None:
    path = classify_cpu_flags({"sse4_2", "avx", "avx2", "fma"}, source="torch.cpu")
    assert not path.native_bf16 and path.path == "emulated-bf16" and path.default_dtype == "float32"
    assert "only avx2" in path.reason and "avx512_bf16" in path.reason and "torch.cpu" in path.reason


def test_detection_agrees_with_torch_and_proc_cpuinfo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    expected = bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    assert cpu_compute_path().native_bf16 is expected
    cpuinfo = devices.Path("/proc/cpuinfo")
    if caps and cpuinfo.exists():
        flags = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split()
        assert ("avx512_bf16" in flags or "amx_bf16" in flags) is expected


def test_default_dtype_follows_the_path_and_an_explicit_dtype_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CPU_BF16_ENV, "native")
    assert default_compute_dtype("cpu") == torch.bfloat16 == torch_dtype_for(None, "cpu")
    assert torch_dtype_for("float32", "cpu") == torch.float32
    assert not emulated_bf16("cpu", torch.bfloat16)
    monkeypatch.setenv(CPU_BF16_ENV, "emulated")
    assert default_compute_dtype("cpu") == torch.float32 == torch_dtype_for(None, "cpu")
    assert torch_dtype_for("bfloat16", "cpu") == torch.bfloat16
    assert emulated_bf16(torch.device("cpu"), torch.bfloat16) and not emulated_bf16("cpu", torch.float32)
    assert not emulated_bf16("cuda:0", torch.bfloat16)
    assert default_compute_dtype("cuda") == torch.bfloat16 and default_compute_dtype("mps") == torch.float32
    assert "overridden" in cpu_compute_path().reason


def test_record_and_console_line_name_the_path_and_the_float32_convolutions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CPU_BF16_ENV, "emulated")
    record = compute_record("cpu", torch.bfloat16)
    assert record["cpu_path"] == "emulated-bf16" and record["float32_ops"] == "convolutions"
    assert record["dtype"] == "bfloat16" and record["device"] == "cpu"
    assert "emulated-bf16" in compute_line("cpu", "float32") and "float32)" not in compute_line("cpu", "float32")
    monkeypatch.setenv(CPU_BF16_ENV, "native")
    assert "float32_ops" not in compute_record("cpu", "bfloat16")
    assert compute_record("cuda", torch.bfloat16) == {"device": "cuda", "dtype": "bfloat16"}
