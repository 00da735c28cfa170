"""The DiT call contract of diffstudio.dit: merging rules, conflicts, branch views, the LoRA combiner."""

from __future__ import annotations

import pytest
import torch
from diffstudio.dit import (
    EXTENSION_INPUTS,
    CombinedDelta,
    DitCall,
    ExtensionConflictError,
    TextStream,
    branch_extensions,
    merge_extensions,
    run_call_hooks,
)
from diffstudio.errors import DiffstudioError
from diffstudio.pipeline.state import PipelineState


def call(batch: int = 1) -> DitCall:
    return DitCall(torch.zeros(batch, 4, 8), torch.zeros(batch, 4, 3), torch.zeros(1, 2, 8), torch.zeros(1, 2, 3),
                   torch.zeros(batch), None, None, 0)  # fmt: skip


def test_two_hooks_replacing_the_text_stream_is_a_typed_error_naming_both():
    stream = TextStream(torch.zeros(1, 2, 8), torch.zeros(1, 2, 3))
    hooks = {"connector": lambda c: {"text_stream": stream}, "nexus": lambda c: {"text_stream": stream}}
    with pytest.raises(ExtensionConflictError, match="call hook 'connector' and call hook 'nexus'") as info:
        run_call_hooks(hooks, call(), {})
    assert isinstance(info.value, DiffstudioError)


def test_two_stack_hooks_conflict_but_residuals_sum():
    with pytest.raises(ExtensionConflictError, match="stack_hook"):
        merge_extensions({"stack_hook": lambda *a: a[0]}, {"stack_hook": lambda *a: a[0]}, "call hook 'cache'")
    one = torch.ones(1, 4, 8)
    merged = merge_extensions({"block_residual": lambda k, i, img: one}, {"block_residual": lambda k, i, img: one})
    assert torch.equal(merged["block_residual"]("double", 0, one), 2 * one)


def test_extra_tokens_concatenate_and_img_cond_joins_channels():
    merged = merge_extensions({"extra_txt": torch.zeros(1, 2, 8), "img_cond": torch.zeros(1, 4, 3)},
                              {"extra_txt": torch.ones(2, 3, 8), "img_cond": torch.ones(1, 4, 5)})  # fmt: skip
    assert merged["extra_txt"].shape == (2, 5, 8) and merged["img_cond"].shape == (1, 4, 8)
    with pytest.raises(ExtensionConflictError, match="extra_txt_ids"):
        merge_extensions({"extra_txt": torch.zeros(1, 2, 8)},
                         {"extra_txt": torch.ones(1, 3, 8), "extra_txt_ids": torch.zeros(1, 3, 3)})  # fmt: skip
    with pytest.raises(ExtensionConflictError, match="'guidance'"):
        merge_extensions({}, {"guidance": torch.zeros(1)}, "call hook 'x'")


def test_branch_view_names_its_branch_and_old_keys_warn():
    state = PipelineState(shared={"a": 1})
    assert state.view("negative")["branch"] == "negative" and "branch" not in state.view("shared")
    with pytest.warns(DeprecationWarning, match="extra_ctx"):
        assert set(branch_extensions({"extra_ctx": torch.zeros(1, 1, 8)})) == {"extra_txt"}
    with pytest.raises(ExtensionConflictError), pytest.warns(DeprecationWarning):
        branch_extensions({"extra_ctx": torch.zeros(1), "extra_txt": torch.zeros(1)})
    assert {"call_hooks", "dit_deltas", "text_stream", "stack_hook", "img_cond"} <= EXTENSION_INPUTS


def test_combined_delta_sums_by_default_and_combines_when_told():
    x = torch.randn(2, 3)
    paths = [lambda v: v * 2, lambda v: v + 1]
    assert torch.equal(CombinedDelta(paths)(x), x * 2 + (x + 1))
    assert torch.equal(CombinedDelta(paths, lambda v, outs: torch.stack(outs).amax(0))(x), torch.maximum(x * 2, x + 1))
