from __future__ import annotations

from typing import Any

import pytest
import torch
from diffstudio.errors import CacheMergeError
from diffstudio.pipeline.base import BasePipeline
from diffstudio.runtime import Runtime
from diffstudio_medium_residual import plugin
from diffstudio_medium_residual.units import BlockResiduals, ResidualHook
from diffstudio_template_sdk.testing import UnitConformance


class WithResidual(BasePipeline):
    family = "residual-test"
    extension_inputs = frozenset({"block_residual"})


class TestUnits(UnitConformance):
    units = (BlockResiduals,)


def test_merge_hook_sums_and_rejects_other_grids(diffstudio_runtime: Runtime, register_plugin: Any) -> None:
    register_plugin(plugin)
    pipe = WithResidual(device="cpu", runtime=diffstudio_runtime)
    r = torch.randn(1, 8, 2, 3)
    merged = diffstudio_runtime.hooks.template_cache_merge("block_residuals", [{"single_0": r}, {"single_0": r}], pipe)
    torch.testing.assert_close(merged["single_0"], 2 * r)
    with pytest.raises(CacheMergeError, match="different resolutions"):
        diffstudio_runtime.hooks.template_cache_merge(
            "block_residuals", [{"single_0": r}, {"single_0": torch.randn(1, 8, 4, 6)}], pipe
        )


def test_hook_returns_row_major_tokens_for_named_blocks_only() -> None:
    grid = torch.randn(1, 8, 2, 3)
    hook = ResidualHook({"double_1": grid.flatten(2).transpose(1, 2)})
    img = torch.zeros(4, 6, 8)
    out = hook("double", 1, img)
    assert out is not None and out.shape == (4, 6, 8)
    torch.testing.assert_close(out[2, 4], grid[0, :, 1, 1])
    assert hook("double", 0, img) is None
