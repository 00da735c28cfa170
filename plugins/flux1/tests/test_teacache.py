"""TeaCache on a tiny FLUX.1 DiT against an oracle transcribed from the published algorithm.

The oracle is TeaCache4FLUX's rule (ali-vilab/TeaCache ``teacache_flux.py``; DiffSynth's ``TeaCache`` class is a
copy): the estimator is the first double block's modulated image input ``(1 + scale) * LayerNorm(img) + shift``,
the relative L1 change is rescaled by the FLUX polynomial and accumulated, the first and last step compute, a
skipped step adds the previous residual. It is written here independently of :mod:`diffstudio.cache` and driven
through the DiT's ``stack_hook`` with one instance per CFG branch (the published code shares one between branches,
which is the DiffSynth CFG bug the issue names). Both runs go through ``FluxImagePipeline.predict_velocity``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffstudio.cache import FLUX1_DEV, StepCacheError, TeaCache
from diffstudio.pipeline.state import PipelineState
from diffstudio_flux1.math import image_ids, text_ids
from diffstudio_flux1.model import Flux
from diffstudio_flux1.params import FluxParams
from diffstudio_flux1.pipeline import FluxImagePipeline

CTX, POOLED, STEPS = 24, 20, 10


class Oracle:
    """TeaCache4FLUX's per-generation state and rule, transcribed (one instance per CFG branch)."""

    def __init__(self, model, rel_l1_thresh, num_steps):
        self.model, self.rel_l1_thresh, self.num_steps = model, rel_l1_thresh, num_steps
        self.cnt, self.accumulated_rel_l1_distance = 0, 0
        self.previous_modulated_input = self.previous_residual = None
        self.rescale_func = np.poly1d([4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01])
        self.mask = []

    def __call__(self, img, vec, run):
        inp, temb_ = img.clone(), vec.clone()
        (shift_msa, scale_msa, _), _ = self.model.double_blocks[0].img_mod(temb_)
        modulated_inp = (1 + scale_msa) * self.model.double_blocks[0].img_norm1(inp) + shift_msa
        if self.cnt == 0 or self.cnt == self.num_steps - 1:
            should_calc = True
            self.accumulated_rel_l1_distance = 0
        else:
            previous = self.previous_modulated_input
            self.accumulated_rel_l1_distance += self.rescale_func(
                ((modulated_inp - previous).abs().mean() / previous.abs().mean()).cpu().item()
            )
            if self.accumulated_rel_l1_distance < self.rel_l1_thresh:
                should_calc = False
            else:
                should_calc = True
                self.accumulated_rel_l1_distance = 0
        self.previous_modulated_input = modulated_inp
        self.cnt += 1
        if self.cnt == self.num_steps:
            self.cnt = 0
        self.mask.append(should_calc)
        if not should_calc:
            img = img + self.previous_residual
        else:
            ori_img = img.clone()
            img = run()
            self.previous_residual = img - ori_img
        return img


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    params = FluxParams(in_channels=64, out_channels=64, vec_in_dim=POOLED, context_in_dim=CTX, hidden_size=64,
                        mlp_ratio=2.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(4, 14, 14),
                        theta=10_000, qkv_bias=True, guidance_embed=True)  # fmt: skip
    model = Flux(params).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 / (p.shape[-1] ** 0.5))
    pipeline = FluxImagePipeline(torch_dtype=torch.float32, device="cpu")
    pipeline.set_component("dit", model)
    return pipeline


def conditions(seed):
    gen = torch.Generator().manual_seed(seed)
    return {"prompt_emb": torch.randn(2, 5, CTX, generator=gen), "text_ids": text_ids(2, 5),
            "pooled_prompt_emb": torch.randn(2, POOLED, generator=gen)}  # fmt: skip


def denoise(pipe, hooks=None, cfg=1.0, call_hooks=None):
    """A 12-step Euler loop through predict_velocity; returns the latents after every step."""
    gen = torch.Generator().manual_seed(7)
    shared = {"latents": torch.randn(2, 16, 64, generator=gen), "image_ids": image_ids(2, 4, 4),
              "guidance": torch.full((2,), 3.5), **({"call_hooks": call_hooks} if call_hooks else {})}  # fmt: skip
    state = PipelineState(shared=shared, positive=conditions(1), negative=conditions(2))
    for name, hook in (hooks or {}).items():
        state.branch(name)["stack_hook"] = hook
    sigmas = torch.linspace(1.0, 0.0, STEPS + 1)
    trace = []
    with torch.no_grad():
        for i in range(STEPS):
            t = sigmas[i] * 1000
            velocity = pipe.predict_velocity(state.view("positive"), i, t)
            if cfg != 1.0:
                negative = pipe.predict_velocity(state.view("negative"), i, t)
                velocity = negative + cfg * (velocity - negative)
            state.shared["latents"] = state.shared["latents"] + (sigmas[i + 1] - sigmas[i]) * velocity
            trace.append(state.shared["latents"].clone())
    return trace


def caches(pipe, thresh, branches):
    ours = {b: TeaCache(thresh, FLUX1_DEV, STEPS) for b in branches}
    return ours, {b: Oracle(pipe.dit, thresh, STEPS) for b in branches}


def assert_same(ours, oracle, trace_ours, trace_oracle):
    for branch, cache in ours.items():
        assert cache.computed == oracle[branch].mask, branch
    for step, (a, b) in enumerate(zip(trace_ours, trace_oracle)):
        assert torch.equal(a, b), f"latents differ after step {step}"


@pytest.mark.parametrize("thresh", [0.3, 0.8])
def test_teacache_matches_published_rule_step_by_step_without_cfg(pipe, thresh):
    ours, oracle = caches(pipe, thresh, ["positive"])
    assert_same(ours, oracle, denoise(pipe, ours), denoise(pipe, oracle))
    mask = ours["positive"].computed
    assert mask[0] and mask[-1] and not all(mask), mask  # some steps skipped, edges computed


def test_teacache_matches_published_rule_with_cfg_one_state_per_branch(pipe):
    ours, oracle = caches(pipe, 0.5, ["positive", "negative"])
    assert_same(ours, oracle, denoise(pipe, ours, cfg=4.0), denoise(pipe, oracle, cfg=4.0))
    assert not all(ours["positive"].computed) and not all(ours["negative"].computed)
    assert ours["positive"].estimates != ours["negative"].estimates  # the branches are measured apart


def test_threshold_zero_is_bit_identical_to_no_cache(pipe):
    ours, _ = caches(pipe, 0.0, ["positive", "negative"])
    got, want = denoise(pipe, ours, cfg=4.0), denoise(pipe, None, cfg=4.0)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert all(ours["positive"].computed) and all(ours["negative"].computed)


def test_huge_threshold_computes_exactly_the_first_and_last_step(pipe):
    ours, oracle = caches(pipe, 1e6, ["positive"])
    assert_same(ours, oracle, denoise(pipe, ours), denoise(pipe, oracle))
    assert ours["positive"].computed == [True] + [False] * (STEPS - 2) + [True]


class CountingControlNet:
    """A ControlNet-style call hook: one residual stack per call, counted."""

    def __init__(self):
        self.calls = []

    def __call__(self, call):
        self.calls.append((call.branch, call.step_index))
        scale = float(call.timesteps[0])
        return {"block_residual": lambda kind, index, img: torch.full_like(img, 0.01 * scale * (index + 1))}


def test_call_hooks_do_not_run_on_skipped_steps_and_their_residual_is_cached(pipe):
    plain, deferred = CountingControlNet(), CountingControlNet()
    want = denoise(pipe, None, cfg=4.0, call_hooks={"controlnet": plain})
    ours, _ = caches(pipe, 0.0, ["positive", "negative"])
    got = denoise(pipe, ours, cfg=4.0, call_hooks={"controlnet": deferred})
    assert all(torch.equal(a, b) for a, b in zip(got, want))  # deferral changes nothing when every step computes
    assert deferred.calls == plain.calls and len(plain.calls) == 2 * STEPS

    counted = CountingControlNet()
    ours, _ = caches(pipe, 0.8, ["positive", "negative"])
    denoise(pipe, ours, cfg=4.0, call_hooks={"controlnet": counted})
    for branch in ("positive", "negative"):
        ran = [step for b, step in counted.calls if b == branch]
        assert ran == [i for i, computed in enumerate(ours[branch].computed) if computed]
        assert len(ran) < STEPS


def test_teacache_refuses_gradients(pipe):
    cache = TeaCache(0.4, FLUX1_DEV, STEPS)
    inputs = {"latents": torch.randn(1, 16, 64), "image_ids": image_ids(1, 4, 4), "guidance": torch.full((1,), 3.5),
              **{k: v[:1] for k, v in conditions(1).items()}, "stack_hook": cache}  # fmt: skip
    with torch.enable_grad(), pytest.raises(StepCacheError, match="gradients"):
        pipe.predict_velocity(inputs, 0, torch.tensor(500.0))
