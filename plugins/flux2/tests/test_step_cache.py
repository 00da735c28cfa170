"""Step caching on a tiny FLUX.2 DiT: the estimator input, TeaCache's edges, First-Block-Cache, and the refusal of
TeaCache without coefficients fitted for the DiT (FLUX.1-dev's polynomial does not belong to FLUX.2)."""

from __future__ import annotations

import pytest
import torch
from diffstudio.cache import CacheCoefficientsError, Coefficients, FirstBlockCache, TeaCache
from diffstudio.cache.units import StepCacheUnit
from diffstudio.pipeline.state import PipelineState
from diffstudio_flux2.math import image_ids, text_ids
from diffstudio_flux2.model import Flux2
from diffstudio_flux2.params import Flux2Params
from diffstudio_flux2.pipeline import Flux2ImagePipeline

CTX, CH, STEPS = 24, 32, 8


@pytest.fixture(scope="module")
def pipe():
    params = Flux2Params(in_channels=CH, context_in_dim=CTX, hidden_size=64, num_heads=2, depth=2,
                         depth_single_blocks=2, axes_dim=(8, 8, 8, 8), theta=2000, mlp_ratio=2.0,
                         use_guidance_embed=False)  # fmt: skip
    model = Flux2(params).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 / p.shape[-1] ** 0.5)
    pipeline = Flux2ImagePipeline(torch_dtype=torch.float32, device="cpu")
    pipeline.set_component("dit", model)
    return pipeline


def denoise(pipe, hook=None):
    gen = torch.Generator().manual_seed(1)
    shared = {"latents": torch.randn(1, 12, CH, generator=gen), "image_ids": image_ids(1, 3, 4),
              "prompt_embeds": torch.randn(1, 5, CTX, generator=gen), "text_ids": text_ids(1, 5)}  # fmt: skip
    state = PipelineState(shared=shared, positive={} if hook is None else {"stack_hook": hook})
    sigmas = torch.linspace(1.0, 0.0, STEPS + 1)
    out = []
    with torch.no_grad():
        for i in range(STEPS):
            v = pipe.predict_velocity(state.view("positive"), i, sigmas[i] * 1000)
            state.shared["latents"] = state.shared["latents"] + (sigmas[i + 1] - sigmas[i]) * v
            out.append(state.shared["latents"].clone())
    return out


@torch.no_grad()
def test_estimator_input_is_the_first_double_blocks_modulated_image_input(pipe):
    seen = {}

    def spy(img, vec, run):
        seen["m"], seen["img"], seen["vec"] = run.modulated_input(), img, vec
        return run()

    denoise(pipe, spy)
    (shift, scale, _), _ = pipe.dit.double_stream_modulation_img(seen["vec"])
    want = (1 + scale) * pipe.dit.double_blocks[0].img_norm1(seen["img"]) + shift
    torch.testing.assert_close(seen["m"], want, rtol=0, atol=1e-6)


def test_teacache_threshold_zero_is_bit_identical_and_huge_computes_only_the_edges(pipe):
    identity = Coefficients((1.0, 0.0))
    zero = TeaCache(0.0, identity, STEPS)
    assert all(torch.equal(a, b) for a, b in zip(denoise(pipe, zero), denoise(pipe)))
    huge = TeaCache(1e6, identity, STEPS)
    denoise(pipe, huge)
    assert huge.computed == [True] + [False] * (STEPS - 2) + [True]


def test_fbcache_runs_on_flux2(pipe):
    cache = FirstBlockCache(1e3)  # above any relative change: only the first step runs the whole stack
    got = denoise(pipe, cache)
    assert cache.computed == [True] + [False] * (STEPS - 1)
    assert torch.isfinite(got[-1]).all()
    zero = FirstBlockCache(0.0)
    assert all(torch.equal(a, b) for a, b in zip(denoise(pipe, zero), denoise(pipe)))


def test_teacache_is_refused_without_coefficients_fitted_for_this_dit(pipe):
    unit = StepCacheUnit()
    with torch.no_grad(), pytest.raises(CacheCoefficientsError, match="flux2 DiT, 2 double / 2 single"):
        unit.process(pipe, tea_cache_l1_thresh=0.4, step_cache=None, tea_cache_coefficients=None,
                     timesteps=torch.ones(STEPS))  # fmt: skip
    with torch.no_grad():
        made = unit.process(pipe, tea_cache_l1_thresh=None, step_cache="fbcache:0.1", tea_cache_coefficients=None,
                            timesteps=torch.ones(STEPS))  # fmt: skip
    assert isinstance(made["stack_hook"], FirstBlockCache)
    assert "tea_cache_l1_thresh" in pipe.accepted_inputs() and "step_cache" in pipe.accepted_inputs()
