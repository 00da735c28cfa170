"""FLUX.2 honours the shared DiT call contract (diffstudio.dit) through predict_velocity.

Each point is checked against passing the same tensors to the DiT forward directly (the oracle).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from diffstudio.dit import DitCall, ExtensionConflictError, TextStream
from diffstudio.errors import PipelineInputError
from diffstudio.pipeline.state import PipelineState
from diffstudio_flux2.math import image_ids, text_ids
from diffstudio_flux2.model import Flux2
from diffstudio_flux2.params import Flux2Params
from diffstudio_flux2.pipeline import Flux2ImagePipeline

CTX, CH = 24, 32


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    params = Flux2Params(in_channels=CH, context_in_dim=CTX, hidden_size=64, num_heads=2, depth=1,
                         depth_single_blocks=1, axes_dim=(8, 8, 8, 8), theta=2000, mlp_ratio=2.0,
                         use_guidance_embed=False)  # fmt: skip
    model = Flux2(params).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    pipeline = Flux2ImagePipeline(torch_dtype=torch.float32, device="cpu")
    pipeline.set_component("dit", model)
    return pipeline


def branch(**extra):
    gen = torch.Generator().manual_seed(1)
    inputs = {
        "latents": torch.randn(1, 12, CH, generator=gen), "image_ids": image_ids(1, 3, 4),
        "prompt_embeds": torch.randn(1, 5, CTX, generator=gen), "text_ids": text_ids(1, 5),
    }  # fmt: skip
    return {**inputs, **extra}


def direct(pipe, inputs, t=0.5, **kwargs):
    return pipe.dit(inputs["latents"], inputs["image_ids"], torch.tensor([t]), inputs["prompt_embeds"],
                    inputs["text_ids"], None, **kwargs)  # fmt: skip


@torch.no_grad()
def test_text_stream_hook_equals_passing_the_replaced_tensors(pipe):
    stream = TextStream(torch.randn(1, 3, CTX, generator=torch.Generator().manual_seed(2)), text_ids(1, 3))
    inputs = branch(call_hooks={"connector": lambda call: {"text_stream": stream}})
    got = pipe.predict_velocity(inputs, 0, torch.tensor(500.0))
    assert torch.equal(got, direct(pipe, {**inputs, "prompt_embeds": stream.txt, "text_ids": stream.txt_ids}))
    assert (got - direct(pipe, inputs)).abs().max() > 1e-3


def test_two_text_stream_replacements_are_a_typed_error_naming_both(pipe):
    stream = TextStream(torch.zeros(1, 3, CTX), text_ids(1, 3))
    hooks = {"step1x": lambda call: {"text_stream": stream}, "nexus": lambda call: {"text_stream": stream}}
    with pytest.raises(ExtensionConflictError, match="'step1x'.*'nexus'"):
        pipe.predict_velocity(branch(call_hooks=hooks), 0, torch.tensor(500.0))


@torch.no_grad()
def test_call_hooks_see_step_timestep_and_branch(pipe):
    seen: list[DitCall] = []
    state = PipelineState(shared=branch(call_hooks={"spy": lambda call: seen.append(call) or {}}))
    pipe.predict_velocity(state.view("positive"), 2, torch.tensor(750.0))
    pipe.predict_velocity(state.view("negative"), 2, torch.tensor(750.0))
    assert [(c.step_index, c.branch, c.y) for c in seen] == [(2, "positive", None), (2, "negative", None)]
    assert torch.allclose(seen[0].timesteps, torch.tensor([0.75]))


@torch.no_grad()
def test_call_hook_residual_and_extra_tokens_equal_passing_them(pipe):
    gen = torch.Generator().manual_seed(3)
    residual = torch.randn(1, 12, 64, generator=gen)
    extra_txt, extra_img, img_ids = torch.randn(1, 2, CTX, generator=gen), torch.randn(1, 4, CH), image_ids(1, 2, 2)

    def hook(call):
        return {"block_residual": lambda kind, index, img: residual if kind == "double" else None,
                "extra_txt": extra_txt, "extra_img": extra_img, "extra_img_ids": img_ids}  # fmt: skip

    got = pipe.predict_velocity(branch(call_hooks={"h": hook}), 0, torch.tensor(500.0))
    want = direct(pipe, branch(), extra_txt=extra_txt, extra_img=extra_img, extra_img_ids=img_ids,
                  block_residual=lambda kind, index, img: residual if kind == "double" else None)  # fmt: skip
    assert torch.equal(got, want)


@torch.no_grad()
def test_stack_hook_reaches_the_forward(pipe):
    calls = []

    def skip_all(img, vec, run):
        calls.append(img.shape)
        return img  # every block skipped

    got = pipe.predict_velocity(branch(stack_hook=skip_all), 0, torch.tensor(500.0))
    assert calls == [(1, 12, 64)]
    assert torch.equal(got, direct(pipe, branch(), skip_blocks=pipe.dit.block_names))


def test_img_cond_is_refused_typed(pipe):
    with pytest.raises(PipelineInputError, match="img_cond"):
        pipe.predict_velocity(branch(img_cond=torch.zeros(1, 12, 4)), 0, torch.tensor(500.0))


@torch.no_grad()
def test_extra_ctx_branch_key_and_forward_names_still_work_with_a_warning(pipe):
    extra = torch.randn(1, 2, CTX)
    want = pipe.predict_velocity(branch(extra_txt=extra), 0, torch.tensor(500.0))
    with pytest.warns(DeprecationWarning, match="extra_ctx"):
        old = pipe.predict_velocity(branch(extra_ctx=extra), 0, torch.tensor(500.0))
    with pytest.warns(DeprecationWarning, match="extra_ctx"):
        old_forward = direct(pipe, branch(), extra_ctx=extra)
    assert torch.equal(old, want) and torch.equal(old_forward, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        direct(pipe, branch(), extra_txt=extra)
    with pytest.raises(TypeError, match="extra_stuff"):
        direct(pipe, branch(), extra_stuff=extra)
