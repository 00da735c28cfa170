"""FLUX.2 DiT parity with diffusers' Flux2Transformer2DModel, loaded from every official layout."""

from __future__ import annotations

import pytest
import torch
from diffstudio_flux2.math import reference_image_ids, text_ids
from diffstudio_flux2.params import FLUX2_PRESETS, Flux2Params
from safetensors import safe_open

LAYOUTS = ("bfl", "diffusers", "diffusers-sharded")


@pytest.mark.parametrize("variant", ["klein", "dev"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_matches_diffusers(dit_cases, helpers, variant, layout):
    case = dit_cases[variant]
    model = case.load(layout)
    inp = helpers.dit_inputs()
    expected = helpers.run_reference(case.reference, inp, case.guidance)
    with torch.no_grad():
        got = model(**inp)
    assert got.shape == expected.shape == inp["x"].shape
    diff = (got - expected).abs().max().item()
    assert diff <= helpers.TOL, f"{variant}/{layout}: max abs diff {diff}"
    assert expected.abs().max() > 0.1


def test_guidance_embedder_only_on_dev(dit_cases):
    klein, dev = dit_cases["klein"].load("bfl"), dit_cases["dev"].load("bfl")
    assert not hasattr(klein, "guidance_in") and hasattr(dev, "guidance_in")
    assert not any(k.startswith("guidance_in") for k in klein.state_dict())


def test_guidance_changes_dev_output(dit_cases, helpers):
    model = dit_cases["dev"].load("bfl")
    inp = helpers.dit_inputs()
    with torch.no_grad():
        a = model(**inp)
        b = model(**{**inp, "guidance": inp["guidance"] + 1.0})
        c = model(**{**inp, "guidance": None})
    assert (a - b).abs().max() > 1e-3 and (a - c).abs().max() > 1e-3


def test_swapped_tensors_are_detected(dit_cases, helpers):
    """The perturbation makes any swap of same-shaped tensors visible far above the tolerance."""
    sd = helpers.load_file(dit_cases["dev"].files["bfl"])
    inp = helpers.dit_inputs()
    with torch.no_grad():
        base = helpers.build_dit(sd)(**inp)
        for a, b in [
            (
                "double_blocks.0.img_attn.norm.query_norm.scale",
                "double_blocks.0.img_attn.norm.key_norm.scale",
            ),
            ("double_blocks.1.txt_attn.norm.key_norm.scale", "double_blocks.1.img_attn.norm.key_norm.scale"),
            ("double_stream_modulation_img.lin.weight", "double_stream_modulation_txt.lin.weight"),
            ("single_blocks.0.linear2.weight", "single_blocks.1.linear2.weight"),
        ]:
            swapped = dict(sd, **{a: sd[b], b: sd[a]})
            diff = (helpers.build_dit(swapped)(**inp) - base).abs().max().item()
            assert diff > 100 * helpers.TOL, f"swapping {a} and {b} changed the output by only {diff}"
        halves = sd["final_layer.adaLN_modulation.1.weight"].chunk(2)
        swapped = dict(sd, **{"final_layer.adaLN_modulation.1.weight": torch.cat(halves[::-1])})
        assert (helpers.build_dit(swapped)(**inp) - base).abs().max() > 100 * helpers.TOL


def test_extra_image_tokens_match_diffusers(dit_cases, helpers):
    """Two reference images (t = 10, 20) appended after x, as the FLUX.2 edit pipelines do."""
    case = dit_cases["klein"]
    model = case.load("bfl")
    inp = helpers.dit_inputs()
    gen = torch.Generator().manual_seed(5)
    ref_ids = reference_image_ids([(2, 3), (3, 2)], batch=2)
    assert ref_ids[0, :, 0].unique().tolist() == [10, 20]
    extra = torch.randn(2, ref_ids.shape[1], helpers.IN_CHANNELS, generator=gen)
    joined = {**inp, "x": torch.cat([inp["x"], extra], 1), "x_ids": torch.cat([inp["x_ids"], ref_ids], 1)}
    expected = helpers.run_reference(case.reference, joined, False)[:, : inp["x"].shape[1]]
    with torch.no_grad():
        got = model(**inp, extra_x=extra, extra_x_ids=ref_ids)
        plain = model(**inp)
    assert (got - expected).abs().max() <= helpers.TOL
    assert (got - plain).abs().max() > 1e-3  # the reference tokens matter


def test_extra_text_tokens_match_diffusers(dit_cases, helpers):
    case = dit_cases["dev"]
    model = case.load("bfl")
    inp = helpers.dit_inputs()
    extra = torch.randn(1, 3, helpers.CONTEXT_DIM, generator=torch.Generator().manual_seed(6))
    ctx_len = inp["ctx"].shape[1]
    joined = {
        **inp,
        "ctx": torch.cat([inp["ctx"], extra.expand(2, -1, -1)], 1),
        "ctx_ids": text_ids(2, ctx_len + 3),
    }
    expected = helpers.run_reference(case.reference, joined, True)
    with torch.no_grad():
        got_default_ids = model(**inp, extra_ctx=extra)
        got_explicit_ids = model(**inp, extra_ctx=extra, extra_ctx_ids=text_ids(1, 3, start=ctx_len))
    assert (got_default_ids - expected).abs().max() <= helpers.TOL
    assert torch.equal(got_default_ids, got_explicit_ids)


def test_kv_extension_matches_diffusers_kv_cache(dit_cases, helpers):
    """Extra post-RoPE K/V per block equal diffusers' cached reference K/V (FLUX.2 klein KV mode)."""
    from diffusers.models.transformers.transformer_flux2 import (
        Flux2KVAttnProcessor,
        Flux2KVCache,
        Flux2KVParallelSelfAttnProcessor,
    )

    case = dit_cases["klein"]
    model = case.load("bfl")
    inp = helpers.dit_inputs(batch=1)
    gen = torch.Generator().manual_seed(7)
    n_kv = 5
    ext = {
        name: tuple(torch.randn(1, n_kv, helpers.HEADS, helpers.HEAD_DIM, generator=gen) for _ in range(2))
        for name in model.block_names
    }
    cache = Flux2KVCache(num_double_layers=2, num_single_layers=2)
    cache.num_ref_tokens = n_kv
    for i in range(2):
        cache.get_double(i).store(*ext[f"double_{i}"])
        cache.get_single(i).store(*ext[f"single_{i}"])
    ref = helpers.diffusers_dit(False, seed=0)
    for block in ref.transformer_blocks:
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in ref.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    expected = helpers.run_reference(ref, inp, False, kv_cache=cache, kv_cache_mode="cached")
    with torch.no_grad():
        got = model(**inp, kv_extension=ext)
        plain = model(**inp)
        one_block = model(**inp, kv_extension={"single_1": ext["single_1"]})
    assert (got - expected).abs().max() <= helpers.TOL
    assert (got - plain).abs().max() > 1e-3 and (one_block - plain).abs().max() > 1e-4
    with pytest.raises(ValueError, match="unknown block names"):
        model(**inp, kv_extension={"double_9": ext["double_0"]})


def test_presets_and_shape_inference(dit_cases):
    assert FLUX2_PRESETS["dev"].head_dim == 128 and FLUX2_PRESETS["dev"].use_guidance_embed
    k4 = Flux2Params.preset("klein-base-4b")
    assert (k4.depth, k4.depth_single_blocks, k4.num_heads, k4.hidden_size) == (5, 20, 24, 3072)
    k9 = Flux2Params.preset("klein-9b")
    assert (k9.depth, k9.depth_single_blocks, k9.num_heads, k9.context_in_dim) == (8, 24, 32, 12288)
    with safe_open(str(dit_cases["dev"].files["bfl"]), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # header only
    params = Flux2Params.from_state_dict_shapes(shapes)
    assert (params.depth, params.depth_single_blocks, params.num_heads, params.hidden_size) == (2, 2, 2, 32)
    assert params.use_guidance_embed and params.mlp_ratio == 3.0 and params.in_channels == 16
    with pytest.raises(ValueError, match="missing"):
        Flux2Params.from_state_dict_shapes({k: v for k, v in shapes.items() if k != "img_in.weight"})
    with pytest.raises(ValueError, match="divisible"):
        Flux2Params(hidden_size=100, num_heads=3)


def test_bad_inputs_raise_clear_errors(dit_cases, helpers):
    model = dit_cases["klein"].load("bfl")
    inp = helpers.dit_inputs()
    with pytest.raises(ValueError, match="x must have shape"):
        model(**{**inp, "x": inp["x"][..., :8]})
    with pytest.raises(ValueError, match="ctx_ids must have shape"):
        model(**{**inp, "ctx_ids": inp["ctx_ids"][:, :3]})
    with pytest.raises(ValueError, match="timesteps must have shape"):
        model(**{**inp, "timesteps": torch.rand(3)})
    with pytest.raises(ValueError, match="extra_x needs extra_x_ids"):
        model(**inp, extra_x=inp["x"])
