from __future__ import annotations

from typing import Any

import torch
from diffstudio.lora import LoraWeights
from diffstudio.nn import DeltaLinear, scoped_deltas
from diffstudio.pipeline.base import BasePipeline
from diffstudio.runtime import Runtime
from diffstudio_medium_lora import plugin
from diffstudio_medium_lora.units import LoraSidePath, LoraSidePaths
from diffstudio_template_sdk.testing import UnitConformance


class WithDeltas(BasePipeline):
    family = "lora-test"
    extension_inputs = frozenset({"dit_deltas"})


class TestUnits(UnitConformance):
    units = (LoraSidePaths,)


def test_merge_hook_concatenates_along_rank(diffstudio_runtime: Runtime, register_plugin: Any) -> None:
    register_plugin(plugin)
    pipe = WithDeltas(device="cpu", runtime=diffstudio_runtime)
    a = LoraWeights(torch.randn(2, 4), torch.randn(3, 2), 4.0)
    b = LoraWeights(torch.randn(1, 4), torch.randn(3, 1))
    merged = diffstudio_runtime.hooks.template_cache_merge("lora", [{"x": a}, {"x": b}], pipe)["x"]
    torch.testing.assert_close(merged.delta_weight(), a.delta_weight() + b.delta_weight())
    assert plugin.template_cache_merge("kv_cache", [1, 2], pipe) is None


def test_side_path_equals_the_dense_update_and_is_removed_after_the_call() -> None:
    layer = DeltaLinear(4, 3)
    weights = LoraWeights(torch.randn(2, 4), torch.randn(3, 2), 1.0)
    x = torch.randn(5, 4)
    with scoped_deltas(layer, {"": LoraSidePath(weights)}, "t"):
        got = layer(x)
        assert list(layer.deltas) == ["t"]
    torch.testing.assert_close(got, layer(x) + x @ weights.delta_weight().T)
    assert layer.deltas == {}
