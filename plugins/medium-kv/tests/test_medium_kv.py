from __future__ import annotations

from typing import Any

import pytest
import torch
from diffstudio.errors import CacheMergeError
from diffstudio.pipeline.base import BasePipeline
from diffstudio.runtime import Runtime
from diffstudio_medium_kv import plugin
from diffstudio_medium_kv.units import CheckKVCache
from diffstudio_template_sdk.testing import UnitConformance


class WithKV(BasePipeline):
    family = "kv-test"
    extension_inputs = frozenset({"kv_extension"})


class Without(BasePipeline):
    family = "plain-test"


class TestUnits(UnitConformance):
    units = (CheckKVCache,)


def test_merge_hook_owns_kv_cache_and_extra_text_only(diffstudio_runtime: Runtime, register_plugin: Any) -> None:
    register_plugin(plugin)
    pipe = WithKV(device="cpu", runtime=diffstudio_runtime)
    a = {"double_0": (torch.ones(1, 2, 2, 4), torch.ones(1, 2, 2, 4))}
    b = {"double_0": (torch.zeros(1, 3, 2, 4), torch.zeros(1, 3, 2, 4))}
    merged = diffstudio_runtime.hooks.template_cache_merge("kv_cache", [a, b], pipe)
    assert merged["double_0"][0].shape == (1, 5, 2, 4)
    text = diffstudio_runtime.hooks.template_cache_merge("extra_text_embedding", [torch.ones(1, 2, 8)] * 2, pipe)
    assert text.shape == (1, 4, 8)
    with pytest.raises(CacheMergeError, match="no installed medium plugin"):  # core's fallback for other keys
        diffstudio_runtime.hooks.template_cache_merge("lora", [{"a": 1}, {"a": 2}], pipe)


def test_the_check_unit_goes_only_to_pipelines_with_a_kv_extension(diffstudio_runtime: Runtime) -> None:
    assert [type(u) for u in plugin.pipeline_unit(WithKV(device="cpu", runtime=diffstudio_runtime)) or []] == [
        CheckKVCache
    ]
    assert plugin.pipeline_unit(Without(device="cpu", runtime=diffstudio_runtime)) is None
