"""FLUX.1 honours the shared DiT call contract (diffstudio.dit) through predict_velocity.

Each new point is checked against passing the same tensors to the DiT forward directly (the oracle).
"""

from __future__ import annotations

import warnings
from collections import ChainMap

import pytest
import torch
from diffstudio.dit import CombinedDelta, DitCall, ExtensionConflictError, TextStream
from diffstudio.nn import delta_linears
from diffstudio.pipeline.state import PipelineState
from diffstudio_flux1.math import image_ids, text_ids
from diffstudio_flux1.model import Flux
from diffstudio_flux1.params import FluxParams
from diffstudio_flux1.pipeline import FluxImagePipeline

CTX, POOLED = 24, 20


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    params = FluxParams(in_channels=64, out_channels=64, vec_in_dim=POOLED, context_in_dim=CTX, hidden_size=64,
                        mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=(4, 14, 14),
                        theta=10_000, qkv_bias=True, guidance_embed=True)  # fmt: skip
    model = Flux(params).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    pipeline = FluxImagePipeline(torch_dtype=torch.float32, device="cpu")
    pipeline.set_component("dit", model)
    return pipeline


def branch(**extra):
    gen = torch.Generator().manual_seed(1)
    inputs = {
        "latents": torch.randn(1, 12, 64, generator=gen), "image_ids": image_ids(1, 3, 4),
        "prompt_emb": torch.randn(1, 5, CTX, generator=gen), "text_ids": text_ids(1, 5),
        "pooled_prompt_emb": torch.randn(1, POOLED, generator=gen), "guidance": torch.tensor([3.5]),
    }  # fmt: skip
    return {**inputs, **extra}


def direct(pipe, inputs, t=0.5, **kwargs):
    return pipe.dit(inputs["latents"], inputs["image_ids"], inputs["prompt_emb"], inputs["text_ids"],
                    torch.tensor([t]), inputs["pooled_prompt_emb"], inputs["guidance"], **kwargs)  # fmt: skip


@torch.no_grad()
def test_text_stream_hook_equals_passing_the_replaced_tensors(pipe):
    gen = torch.Generator().manual_seed(2)
    stream = TextStream(torch.randn(1, 3, CTX, generator=gen), text_ids(1, 3), torch.randn(1, POOLED, generator=gen))
    inputs = branch(call_hooks={"connector": lambda call: {"text_stream": stream}})
    got = pipe.predict_velocity(inputs, 0, torch.tensor(500.0))
    want = direct(pipe, {**inputs, "prompt_emb": stream.txt, "text_ids": stream.txt_ids,
                         "pooled_prompt_emb": stream.y})  # fmt: skip
    assert torch.equal(got, want)
    assert (got - direct(pipe, inputs)).abs().max() > 1e-3


def test_two_text_stream_replacements_are_a_typed_error_naming_both(pipe):
    stream = TextStream(torch.zeros(1, 3, CTX), text_ids(1, 3))
    hooks = {"step1x": lambda call: {"text_stream": stream}, "nexus": lambda call: {"text_stream": stream}}
    with pytest.raises(ExtensionConflictError, match="'step1x'.*'nexus'"):
        pipe.predict_velocity(branch(call_hooks=hooks), 0, torch.tensor(500.0))
    with pytest.raises(ExtensionConflictError, match="branch inputs.*'nexus'"):
        pipe.predict_velocity(branch(text_stream=stream, call_hooks={"nexus": hooks["nexus"]}), 0, torch.tensor(5.0))


@torch.no_grad()
def test_call_hooks_see_step_timestep_and_branch(pipe):
    seen: list[DitCall] = []
    state = PipelineState(shared=branch(call_hooks={"spy": lambda call: seen.append(call) or {}}))
    pipe.predict_velocity(state.view("positive"), 3, torch.tensor(250.0))
    pipe.predict_velocity(state.view("negative"), 3, torch.tensor(250.0))
    assert [(c.step_index, c.branch) for c in seen] == [(3, "positive"), (3, "negative")]
    assert torch.allclose(seen[0].timesteps, torch.tensor([0.25])) and seen[0].y is not None


@torch.no_grad()
def test_stack_hook_reaches_the_forward_with_per_branch_state(pipe):
    cache: dict[str, torch.Tensor] = {}

    def caching(name):
        def hook(img, vec, run):
            if name not in cache:
                cache[name] = run() - img
            return img + cache[name]

        return hook

    inputs = branch()
    plain = pipe.predict_velocity(inputs, 0, torch.tensor(500.0))
    first = pipe.predict_velocity({**inputs, "stack_hook": caching("positive")}, 0, torch.tensor(500.0))
    assert torch.allclose(first, plain, atol=1e-5) and set(cache) == {"positive"}
    # the cached residual is reused at another step: the output differs from a real run there
    reused = pipe.predict_velocity({**inputs, "stack_hook": caching("positive")}, 1, torch.tensor(100.0))
    assert (reused - pipe.predict_velocity(inputs, 1, torch.tensor(100.0))).abs().max() > 1e-4


@torch.no_grad()
def test_extra_image_tokens_from_a_hook_equal_passing_them(pipe):
    gen = torch.Generator().manual_seed(3)
    extra, ids = torch.randn(1, 4, 64, generator=gen), image_ids(1, 2, 2, t=0)
    inputs = branch(call_hooks={"step1x": lambda call: {"extra_img": extra, "extra_img_ids": ids}})
    got = pipe.predict_velocity(inputs, 0, torch.tensor(500.0))
    assert torch.equal(got, direct(pipe, inputs, extra_img=extra, extra_img_ids=ids))


@torch.no_grad()
def test_dit_deltas_and_a_lora_combiner_are_honoured(pipe):
    path = next(name for name, _ in delta_linears(pipe.dit) if name.endswith("img_attn.qkv"))
    a, b = (lambda x: 0.1 * x.repeat(1, 1, 3)), (lambda x: 0.2 * torch.ones(*x.shape[:-1], 192))
    inputs = branch()
    summed = pipe.predict_velocity({**inputs, "dit_deltas": {path: CombinedDelta([a, b])}}, 0, torch.tensor(500.0))
    layer = dict(delta_linears(pipe.dit))[path]
    layer.add_delta("a", a)
    layer.add_delta("b", b)
    try:
        separate = pipe.predict_velocity(inputs, 0, torch.tensor(500.0))
    finally:
        layer.clear_deltas()
    assert torch.allclose(summed, separate, rtol=1e-4, atol=1e-4)
    maxed = pipe.predict_velocity(
        {**inputs, "dit_deltas": {path: CombinedDelta([a, b], lambda x, outs: torch.maximum(*outs))}}, 0,
        torch.tensor(500.0),
    )  # fmt: skip
    assert (maxed - summed).abs().max() > 1e-4
    assert not layer.deltas  # attached for the call only


def test_old_flux2_key_names_warn(pipe):
    with pytest.warns(DeprecationWarning, match="extra_ctx"):
        pipe.predict_velocity(ChainMap(branch(), {"extra_ctx": torch.zeros(1, 2, CTX)}), 0, torch.tensor(5.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.predict_velocity(branch(extra_txt=torch.zeros(1, 2, CTX)), 0, torch.tensor(5.0))
