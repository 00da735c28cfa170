"""Meta-device construction and strict, zero-copy assignment of memory-mapped tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffstudio.errors import StrictLoadError
from diffstudio.loading import Checkpoint, MetaTensorsRemainError, build_on_meta, load_state_dict_into
from safetensors.torch import save_file
from torch import nn


class Rope(nn.Module):
    """Holds a non-persistent ``(dim // 2,)`` frequency table, recomputed by reset_non_persistent_buffers."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("freqs", torch.empty(dim // 2), persistent=False)
        self.reset_non_persistent_buffers()

    def reset_non_persistent_buffers(self) -> None:
        self.freqs = 1.0 / (10000 ** (torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim))


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.out = nn.Linear(16, 4, bias=False)
        self.rope = Rope(8)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        freqs: torch.Tensor = self.rope.freqs
        out: torch.Tensor = self.out(torch.relu(self.proj(x) * freqs.repeat(4)))
        return out


def mapped_file(address: int) -> str | None:
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= address < high:
            return fields[5] if len(fields) == 6 else None
    return None


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Tiny, Path]:
    torch.manual_seed(0)
    reference = Tiny()
    with torch.no_grad():
        reference.get_buffer("step").fill_(7)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    return reference, path


def test_build_on_meta_allocates_nothing() -> None:
    model = build_on_meta(Tiny)
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_zero_copy_assignment(saved: tuple[Tiny, Path]) -> None:
    reference, path = saved
    checkpoint = Checkpoint.open(path)
    state = checkpoint.state_dict()
    model = build_on_meta(Tiny)
    load_state_dict_into(model, state)
    for name, parameter in model.named_parameters():
        assert isinstance(parameter, nn.Parameter) and parameter.requires_grad
        assert parameter.data_ptr() == state[name].data_ptr(), name
        assert mapped_file(parameter.data_ptr()) == str(path.resolve()), name
    step = model.get_buffer("step")
    assert int(step) == 7 and step.dtype == torch.int64
    assert model.rope.freqs.device.type == "cpu" and torch.equal(model.rope.freqs, reference.rope.freqs)
    x = torch.randn(3, 8)
    assert torch.equal(model(x), reference(x))


def test_dtype_and_device_conversion(saved: tuple[Tiny, Path]) -> None:
    reference, path = saved
    state = Checkpoint.open(path).state_dict()
    model = build_on_meta(Tiny)
    load_state_dict_into(model, state, dtype=torch.bfloat16, device="cpu")
    assert model.proj.weight.dtype == torch.bfloat16 and isinstance(model.proj.weight, nn.Parameter)
    assert model.proj.weight.data_ptr() != state["proj.weight"].data_ptr()
    assert torch.equal(model.proj.weight, reference.proj.weight.to(torch.bfloat16))
    assert model.get_buffer("step").dtype == torch.int64  # integer buffers keep their dtype
    assert model.rope.freqs.dtype == torch.float32  # recomputed, not converted


def test_requires_grad_false_is_preserved(saved: tuple[Tiny, Path]) -> None:
    _, path = saved
    model = build_on_meta(Tiny)
    model.out.weight.requires_grad_(False)
    load_state_dict_into(model, Checkpoint.open(path).state_dict())
    assert not model.out.weight.requires_grad and model.proj.weight.requires_grad


def test_strict_errors_list_every_problem_at_once(saved: tuple[Tiny, Path]) -> None:
    _, path = saved
    state = dict(Checkpoint.open(path).state_dict())
    del state["out.weight"]
    state["proj.extra"] = torch.zeros(1)
    state["proj.bias"] = torch.zeros(15)
    model = build_on_meta(Tiny)
    with pytest.raises(StrictLoadError) as info:
        load_state_dict_into(model, state)
    error = info.value
    assert error.missing == ["out.weight"] and error.unexpected == ["proj.extra"]
    assert error.mismatched == ["proj.bias: checkpoint [15] vs model [16]"]
    message = str(error)
    assert "Tiny" in message and "out.weight" in message and "proj.extra" in message and "[15]" in message
    assert model.proj.weight.is_meta  # nothing was half-assigned


def test_non_strict_ignores_unexpected_but_not_shapes(saved: tuple[Tiny, Path]) -> None:
    _, path = saved
    state = dict(Checkpoint.open(path).state_dict())
    state["extra"] = torch.zeros(1)
    model = build_on_meta(Tiny)
    load_state_dict_into(model, state, strict=False)
    assert not model.proj.weight.is_meta
    state["out.weight"] = torch.zeros(4, 15)
    with pytest.raises(StrictLoadError) as info:
        load_state_dict_into(build_on_meta(Tiny), state, strict=False)
    assert info.value.missing == [] and info.value.unexpected == [] and len(info.value.mismatched) == 1


def test_missing_keys_on_meta_are_an_error_when_not_strict(saved: tuple[Tiny, Path]) -> None:
    _, path = saved
    state = dict(Checkpoint.open(path).state_dict())
    del state["out.weight"]
    with pytest.raises(MetaTensorsRemainError, match="out.weight"):
        load_state_dict_into(build_on_meta(Tiny), state, strict=False)


class Plain(nn.Module):
    """A non-persistent buffer without a reset method."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.register_buffer("table", torch.arange(3.0), persistent=False)


def test_non_persistent_buffer_needs_a_way_to_be_rebuilt(tmp_path: Path) -> None:
    source = Plain()
    path = tmp_path / "plain.safetensors"
    save_file(source.state_dict(), str(path))
    with pytest.raises(MetaTensorsRemainError) as info:
        load_state_dict_into(build_on_meta(Plain), Checkpoint.open(path).state_dict())
    assert "table" in str(info.value) and "reset_non_persistent_buffers" in str(info.value)
    assert "init_non_persistent" in str(info.value)

    seen: list[torch.device] = []

    def init(module: nn.Module) -> None:
        seen.append(torch.empty(0).device)  # the default device inside the callback
        module.register_buffer("table", torch.arange(3.0), persistent=False)

    model = build_on_meta(Plain)
    load_state_dict_into(model, Checkpoint.open(path).state_dict(), init_non_persistent=init)
    assert seen == [torch.device("cpu")]
    table = model.get_buffer("table")
    assert torch.equal(table, torch.arange(3.0)) and table.device.type == "cpu"


def test_normally_built_module_also_works(saved: tuple[Tiny, Path]) -> None:
    reference, path = saved
    model = Tiny()
    load_state_dict_into(model, Checkpoint.open(path).state_dict())
    assert torch.equal(model.proj.weight, reference.proj.weight)


def test_strict_unexpected_key_alone_is_an_error(saved: tuple[Tiny, Path]) -> None:
    _, path = saved
    state = {**Checkpoint.open(path).state_dict(), "lora_A.weight": torch.zeros(2, 2)}
    with pytest.raises(StrictLoadError, match=r"Unexpected keys \(1\): lora_A.weight") as info:
        load_state_dict_into(build_on_meta(Tiny), state)
    assert info.value.missing == [] and info.value.mismatched == []
