"""FLUX.1 DiT parity with diffusers' FluxTransformer2DModel, loaded through ModelConfig from every layout."""

from __future__ import annotations

import pytest
import torch
from diffstudio_flux1.convert import convert_bfl_to_diffusers_dit, convert_diffusers_to_bfl_dit
from diffstudio_flux1.math import KONTEXT_T, image_ids
from diffstudio_flux1.model import Flux
from diffstudio_flux1.params import FLUX1_PRESETS, FluxParams, default_axes_dim
from safetensors.torch import load_file

LAYOUTS = ("bfl", "diffusers", "diffusers-sharded")


@pytest.mark.parametrize("variant", ["schnell", "dev"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_matches_diffusers(dit_cases, helpers, variant, layout):
    case = dit_cases[variant]
    model = case.load(layout)
    assert isinstance(model, Flux) and model.params.axes_dim == helpers.AXES
    inp = helpers.dit_inputs()
    expected = helpers.run_reference(case.reference, inp, case.guidance)
    with torch.no_grad():
        got = model(**inp)
    assert got.shape == expected.shape == inp["img"].shape
    diff = (got - expected).abs().max().item()
    assert diff <= helpers.TOL, f"{variant}/{layout}: max abs diff {diff}"
    assert expected.abs().max() > 0.1


def test_claims_name_variant_and_layout(dit_cases, helpers):
    _, bfl = helpers.load(dit_cases["dev"].files["bfl"])
    _, folder = helpers.load(dit_cases["schnell"].files["diffusers-sharded"])
    assert (bfl.family, bfl.model_type, bfl.component, bfl.source_format) == ("flux1", "flux1-dit/custom", "dit", "bfl")
    assert (folder.model_type, folder.source_format) == ("flux1-dit/custom", "diffusers")


def test_comfyui_prefixed_file_loads(dit_cases, helpers, tmp_path):
    from safetensors.torch import save_file

    sd = load_file(dit_cases["dev"].files["bfl"])
    path = tmp_path / "comfy.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in sd.items()}, str(path))
    model, claim = helpers.load(path)
    assert claim.source_format == "comfy"
    inp = helpers.dit_inputs()
    with torch.no_grad():
        assert torch.equal(model(**inp), dit_cases["dev"].load("bfl")(**inp))


def test_guidance_is_required_by_dev_and_ignored_by_schnell(dit_cases, helpers):
    dev, schnell = dit_cases["dev"].load("bfl"), dit_cases["schnell"].load("bfl")
    inp = helpers.dit_inputs()
    with torch.no_grad():
        a = dev(**inp)
        b = dev(**{**inp, "guidance": inp["guidance"] + 1.0})
        assert (a - b).abs().max() > 1e-3
        with pytest.raises(ValueError, match="guidance"):
            dev(**{**inp, "guidance": None})
        assert torch.equal(schnell(**inp), schnell(**{**inp, "guidance": None}))
    assert not any(k.startswith("guidance_in") for k in schnell.state_dict())


def test_swapped_tensors_are_detected(dit_cases, helpers):
    """The perturbation makes any swap of same-shaped tensors visible far above the tolerance."""
    sd = load_file(dit_cases["dev"].files["bfl"])
    inp = helpers.dit_inputs()

    def run(state):
        params = FluxParams.from_state_dict_shapes({k: tuple(v.shape) for k, v in state.items()})
        with torch.device("meta"):
            model = Flux(params)
        model.load_state_dict(state, strict=True, assign=True)
        with torch.no_grad():
            return model(**inp)

    base = run(sd)
    pairs = [
        ("double_blocks.0.img_attn.norm.query_norm.scale", "double_blocks.0.img_attn.norm.key_norm.scale"),
        ("double_blocks.1.txt_attn.norm.key_norm.scale", "double_blocks.1.img_attn.norm.key_norm.scale"),
        ("double_blocks.0.img_mod.lin.weight", "double_blocks.0.txt_mod.lin.weight"),
        ("single_blocks.0.linear2.weight", "single_blocks.1.linear2.weight"),
        ("time_in.in_layer.weight", "guidance_in.in_layer.weight"),
    ]
    for a, b in pairs:
        diff = (run(dict(sd, **{a: sd[b], b: sd[a]})) - base).abs().max().item()
        assert diff > 100 * helpers.TOL, f"swapping {a} and {b} changed the output by only {diff}"
    key = "final_layer.adaLN_modulation.1.weight"
    halves = sd[key].chunk(2)
    assert (run(dict(sd, **{key: torch.cat(halves[::-1])})) - base).abs().max() > 100 * helpers.TOL


def test_converters_round_trip_exactly(dit_cases, helpers):
    folder = helpers.read_folder(dit_cases["dev"].files["diffusers"])
    bfl = convert_diffusers_to_bfl_dit(folder)
    back = convert_bfl_to_diffusers_dit(bfl)
    assert set(back) == set(folder) and all(torch.equal(back[k], folder[k]) for k in folder)
    assert set(bfl) == set(load_file(dit_cases["dev"].files["bfl"]))


def test_kontext_tokens_match_diffusers(dit_cases, helpers):
    """Reference-image tokens with ids (1, row, col) appended after the target, as FluxKontextPipeline does."""
    case = dit_cases["dev"]
    model = case.load("bfl")
    inp = helpers.dit_inputs()
    ref_ids = image_ids(1, 3, 4, t=KONTEXT_T)
    extra = torch.randn(1, 12, helpers.IN_CHANNELS, generator=torch.Generator().manual_seed(5))
    joined = {
        **inp,
        "img": torch.cat([inp["img"], extra.expand(2, -1, -1)], 1),
        "img_ids": torch.cat([inp["img_ids"], ref_ids[0]], 0),
    }
    expected = helpers.run_reference(case.reference, joined, True)[:, : inp["img"].shape[1]]
    with torch.no_grad():
        got = model(**inp, extra_img=extra, extra_img_ids=ref_ids)
        plain = model(**inp)
    assert (got - expected).abs().max() <= helpers.TOL
    assert (got - plain).abs().max() > 1e-3


def test_extra_text_tokens_match_diffusers(dit_cases, helpers):
    case = dit_cases["schnell"]
    model = case.load("bfl")
    inp = helpers.dit_inputs()
    extra = torch.randn(1, 3, helpers.CONTEXT_DIM, generator=torch.Generator().manual_seed(6))
    joined = {
        **inp,
        "txt": torch.cat([inp["txt"], extra.expand(2, -1, -1)], 1),
        "txt_ids": torch.zeros(inp["txt"].shape[1] + 3, 3, dtype=torch.long),
    }
    expected = helpers.run_reference(case.reference, joined, False)
    with torch.no_grad():
        got = model(**inp, extra_txt=extra)
    assert (got - expected).abs().max() <= helpers.TOL


def test_block_residuals_match_diffusers_controlnet_samples(dit_cases, helpers):
    case = dit_cases["dev"]
    model = case.load("diffusers")
    inp = helpers.dit_inputs()
    gen = torch.Generator().manual_seed(8)
    hidden = model.hidden_size
    double = [torch.randn(2, 24, hidden, generator=gen) for _ in range(2)]
    single = [torch.randn(2, 24, hidden, generator=gen) for _ in range(2)]
    expected = helpers.run_reference(
        case.reference, inp, True, controlnet_block_samples=double, controlnet_single_block_samples=single
    )
    calls = []

    def residual(kind, index, img):
        calls.append((kind, index, tuple(img.shape)))
        return (double if kind == "double" else single)[index]

    with torch.no_grad():
        got = model(**inp, block_residual=residual)
    assert (got - expected).abs().max() <= helpers.TOL
    assert [c[:2] for c in calls] == [("double", 0), ("double", 1), ("single", 0), ("single", 1)]
    assert all(c[2] == (2, 24, hidden) for c in calls)


def test_fill_style_extra_input_channels(tmp_path, helpers):
    """in_channels 128 = 64 latent + 64 conditioning channels, concatenated by the DiT (img_cond)."""
    case = helpers.save_dit_case(tmp_path, guidance=True, seed=4, in_channels=128)
    model = case.load("bfl")
    assert (model.in_channels, model.out_channels) == (128, 64)
    inp = helpers.dit_inputs()
    cond = torch.randn(2, 24, 64, generator=torch.Generator().manual_seed(9))
    expected = helpers.run_reference(case.reference, {**inp, "img": torch.cat([inp["img"], cond], -1)}, True)
    with torch.no_grad():
        got = model(**inp, img_cond=cond)
        with pytest.raises(ValueError, match="img_cond"):
            model(**inp)
    assert (got - expected).abs().max() <= helpers.TOL


def test_presets_and_shape_inference():
    dev = FLUX1_PRESETS["dev"]
    assert (dev.head_dim, dev.axes_dim, dev.mlp_hidden_dim, dev.guidance_embed) == (128, (16, 56, 56), 12288, True)
    assert not FluxParams.preset("schnell").guidance_embed and FluxParams.preset("fill-dev").in_channels == 384
    assert default_axes_dim(128) == (16, 56, 56) and default_axes_dim(32) == (4, 14, 14)
    with pytest.raises(ValueError, match="RoPE"):
        default_axes_dim(16)
    with torch.device("meta"):
        model = Flux(FluxParams(depth=1, depth_single_blocks=1))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    inferred = FluxParams.from_state_dict_shapes(shapes)
    assert inferred == FluxParams(depth=1, depth_single_blocks=1)
