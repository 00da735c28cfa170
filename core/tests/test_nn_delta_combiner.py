"""``DeltaLinear.set_combiner``: a combiner sees the base output and each side path's output (LoRA-Fusion's hook)."""

from __future__ import annotations

import pytest
import torch
from diffstudio.lora import LoraMergerActiveError, LoraWeights, attach_lora, merge_lora
from diffstudio.nn import DeltaLinear, linear
from torch import Tensor, nn


class Recorder(nn.Module):
    """A combiner that is an ``nn.Module`` (as LoRA-Fusion's gates are): keeps the base, weights the deltas."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([0.25, -2.0]))
        self.calls: list[int] = []

    def forward(self, base: Tensor, outputs: list[Tensor]) -> Tensor:
        self.calls.append(len(outputs))
        return base + sum(w * out for w, out in zip(self.weight, outputs, strict=True))


def _layer() -> tuple[DeltaLinear, Tensor]:
    torch.manual_seed(0)
    layer = DeltaLinear(6, 4)
    return layer, torch.randn(3, 6)


def test_the_combiner_gets_the_base_output_and_each_side_path() -> None:
    layer, x = _layer()
    first, second = (lambda v: v[:, :4] * 2.0), (lambda v: v[:, 2:] + 1.0)
    layer.add_delta("a", first)
    layer.add_delta("b", second)
    combiner = Recorder()
    layer.set_combiner(combiner)
    with torch.no_grad():
        got = layer(x)
        expected = linear(x, layer.weight, layer.bias) + 0.25 * first(x) - 2.0 * second(x)
    assert torch.allclose(got, expected, atol=1e-6) and combiner.calls == [2]
    assert set(layer.state_dict()) == {"weight", "bias"} and layer.combiner is combiner  # not a submodule
    layer.set_combiner(None)
    with torch.no_grad():
        assert torch.equal(layer(x), linear(x, layer.weight, layer.bias) + first(x) + second(x))


def test_without_side_paths_the_combiner_is_not_called() -> None:
    layer, x = _layer()
    with torch.no_grad():
        base = layer(x)
        combiner = Recorder()
        layer.set_combiner(combiner)
        assert torch.equal(layer(x), base) and combiner.calls == []


def test_fusing_into_a_layer_with_a_combiner_is_refused_before_any_change() -> None:
    model = nn.Sequential(DeltaLinear(6, 4), DeltaLinear(4, 4))
    lora = {name: LoraWeights(torch.randn(2, m.in_features), torch.randn(m.out_features, 2))
            for name, m in model.named_children()}  # fmt: skip
    attach_lora(model, lora, "side")
    model[1].set_combiner(Recorder())
    before = [m.weight.clone() for m in model]
    with pytest.raises(LoraMergerActiveError, match="fuse=False"):
        merge_lora(model, lora)
    assert all(torch.equal(b, m.weight) for b, m in zip(before, model, strict=True))
