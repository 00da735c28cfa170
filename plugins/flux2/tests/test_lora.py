"""FLUX.2 LoRA at inference: every layout against diffusers (or a hand-merged dense reference), side path vs
fused, stacking, removal, exact q/k/v fusion, writers and errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from diffstudio.errors import CheckpointError, PickleRefusedError, SafetensorsFormatError
from diffstudio.lora import LoraWeights
from diffstudio.testing import import_file
from diffstudio_flux2.lora import (
    AmbiguousLoraFormatError,
    LoraMatchError,
    LoraNameError,
    UnknownLoraFormatError,
    apply_lora,
    detect_lora_format,
    fuse_lora_parts,
    list_loras,
    load_lora,
    lora_formats,
    read_lora_file,
    remove_lora,
    save_lora_file,
    split_lora_parts,
)
from safetensors.torch import save_file


def _fixtures():
    return import_file(Path(__file__).with_name("lora_fixtures.py"))


fx = _fixtures()
TOL = 1e-4


@pytest.fixture(scope="module")
def klein(dit_cases):
    return dit_cases["klein"]


def _assert_close(got, expected, tol=TOL, what=""):
    diff = (got - expected).abs().max().item()
    assert diff <= tol, f"{what}: max abs diff {diff}"


def _diffusers_spec(case, seed, **kwargs):
    return fx.make_spec(fx.linear_shapes(case.reference), seed, **kwargs)


def _bfl_spec(case, seed, *, exclude=(), **kwargs):
    shapes = fx.linear_shapes(case.load("bfl"))
    return fx.make_spec({n: s for n, s in shapes.items() if not any(e in n for e in exclude)}, seed, **kwargs)


def _dense_delta(lora):
    return {path: w.delta_weight() for path, w in lora.items()}


def _assert_same_deltas(a, b, tol=1e-6):
    da, db = _dense_delta(a), _dense_delta(b)
    assert set(da) == set(db)
    for path in da:
        _assert_close(da[path], db[path], tol, path)


# --- every layout against diffusers and the dense reference

# (key prefix, PEFT adapter suffix, where alphas are, diffusers reads it as): the DiffSynth layout is the
# prefix-less one with `.default` and no alphas.
DIFFUSERS_VARIANTS = {
    "peft-file": ("transformer.", "", "config", "file"),
    "diffsynth": ("", ".default", None, "renamed"),
    "raw-peft": ("base_model.model.", ".default", "config", "renamed"),
    "alpha-tensors": ("transformer.", "", "tensors", None),
}


@pytest.mark.parametrize("variant", list(DIFFUSERS_VARIANTS))
def test_diffusers_layouts(klein, helpers, tmp_path, variant):
    prefix, adapter, alphas, diffusers_reads = DIFFUSERS_VARIANTS[variant]
    spec = _diffusers_spec(klein, seed=11, alphas=alphas is not None)
    path = tmp_path / "lora.safetensors"
    save_file(fx.diffusers_keys(spec, prefix, adapter, alphas == "tensors"), str(path),
              metadata=fx.peft_metadata(spec) if alphas == "config" else None)
    model = klein.load("bfl")
    report = apply_lora(model, path)
    assert report.format == "flux2/diffusers" and not report.unmatched_keys
    assert report.modules["double_blocks.*.img_attn.qkv"] == 2 and report.modules["single_blocks.*.linear1"] == 2
    got = fx.run(model, helpers)
    expected = fx.run(fx.dense_reference(klein, helpers, diffusers_specs=[(spec, 1.0)]), helpers)
    _assert_close(got, expected, what=f"{variant} vs dense reference")
    assert (got - fx.run(klein.load("bfl"), helpers)).abs().max() > 0.1
    if diffusers_reads == "file":
        _assert_close(got, fx.diffusers_output(klein, helpers, str(path)), what=f"{variant} vs diffusers")
    elif diffusers_reads == "renamed":  # diffusers wants `transformer.` keys without the adapter name
        renamed = fx.diffusers_keys(spec)
        config = fx.peft_config(spec) if alphas else None
        _assert_close(got, fx.diffusers_output(klein, helpers, renamed, config), what=f"{variant} vs diffusers")


BFL_VARIANTS = {
    # diffusers' ai-toolkit reader takes neither alphas nor the final norm (it does not swap its halves)
    "ai-toolkit": ("diffusion_model.", ("lora_A", "lora_B"), False, True),
    "comfy-alpha": ("diffusion_model.", ("lora_A", "lora_B"), True, False),
    "down-up": ("model.diffusion_model.", ("lora_down", "lora_up"), True, False),
    "no-prefix": ("", ("lora_A", "lora_B"), True, False),
    # raw PEFT over BFL module names: diffusers reads base_model.model. as the ai-toolkit prefix
    "peft-bfl": ("base_model.model.", ("lora_A", "lora_B"), False, True),
}


@pytest.mark.parametrize("variant", list(BFL_VARIANTS))
def test_bfl_layouts(klein, helpers, tmp_path, variant):
    prefix, names, alphas, via_diffusers = BFL_VARIANTS[variant]
    exclude = ("final_layer.adaLN_modulation",) if via_diffusers else ()
    spec = _bfl_spec(klein, seed=12, exclude=exclude, alphas=alphas)
    path = tmp_path / "lora.safetensors"
    save_file(fx.bfl_keys(spec, prefix, names, alphas), str(path))
    model = klein.load("bfl")
    report = apply_lora(model, path, name="bfl")
    assert report.format == "flux2/bfl" and not report.unmatched_keys and report.modules_matched == len(spec)
    got = fx.run(model, helpers)
    _assert_close(got, fx.run(fx.dense_reference(klein, helpers, bfl_specs=[(spec, 1.0)]), helpers), what=variant)
    if via_diffusers:
        _assert_close(got, fx.diffusers_output(klein, helpers, str(path)), what=f"{variant} vs diffusers")


def test_diffusion_model_prefix_over_diffusers_block_names_matches_diffusers(klein, helpers, tmp_path):
    # some ai-toolkit exports keep diffusers block names under diffusion_model.; diffusers reads only blocks there
    shapes = fx.linear_shapes(klein.reference)
    blocks = {n: s for n, s in shapes.items() if n.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    spec = fx.make_spec(blocks, seed=23, alphas=False)
    path = tmp_path / "lora.safetensors"
    save_file(fx.diffusers_keys(spec, "diffusion_model."), str(path))
    model = klein.load("bfl")
    report = apply_lora(model, path)
    assert report.format == "flux2/diffusers" and not report.unmatched_keys
    assert report.modules["single_blocks.*.linear1"] == 2 and report.modules["double_blocks.*.txt_attn.qkv"] == 2
    got = fx.run(model, helpers)
    _assert_close(got, fx.diffusers_output(klein, helpers, str(path)), what="diffusion_model. + diffusers names")
    assert (got - fx.run(klein.load("bfl"), helpers)).abs().max() > 0.1


def test_bfl_layout_with_guidance_embedder(dit_cases, helpers):
    case = dit_cases["dev"]
    spec = _bfl_spec(case, seed=13)
    assert any(name.startswith("guidance_in.") for name in spec)
    model = case.load("bfl")
    apply_lora(model, fx.bfl_keys(spec), scale=0.5)
    expected = fx.dense_reference(case, helpers, bfl_specs=[(spec, 0.5)])
    _assert_close(fx.run(model, helpers), fx.run(expected, helpers))


def test_kohya_matches_diffusers(klein, helpers, tmp_path):
    # diffusers' kohya reader has no modulation and no final-norm keys; the full file is checked below
    spec = _bfl_spec(klein, seed=14, exclude=("modulation",))
    path = tmp_path / "kohya.safetensors"
    save_file(fx.kohya_keys(spec), str(path), metadata={"ss_network_dim": "4"})
    model = klein.load("bfl")
    report = apply_lora(model, path)
    assert report.format == "flux2/kohya" and report.name == "kohya" and not report.unmatched_keys
    _assert_close(fx.run(model, helpers), fx.diffusers_output(klein, helpers, str(path)), what="kohya")


@pytest.mark.parametrize("names", ["bfl", "diffusers"])
def test_kohya_full_against_dense_reference(klein, helpers, names):
    if names == "bfl":
        spec = _bfl_spec(klein, seed=15)
        expected = fx.dense_reference(klein, helpers, bfl_specs=[(spec, 0.8)])
    else:  # lora_unet_transformer_blocks_0_attn_to_q ...: split q/k/v fused on the way
        spec = _diffusers_spec(klein, seed=15)
        expected = fx.dense_reference(klein, helpers, diffusers_specs=[(spec, 0.8)])
    model = klein.load("bfl")
    report = apply_lora(model, fx.kohya_keys(spec), scale=0.8)
    assert report.format == "flux2/kohya" and not report.unmatched_keys
    assert report.modules["double_stream_modulation_img.lin"] == 1
    _assert_close(fx.run(model, helpers), fx.run(expected, helpers))


# --- side path, fused, stacking, removal


def test_side_path_fused_and_exact_removal(klein, helpers):
    spec = _bfl_spec(klein, seed=16)
    model = klein.load("bfl")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = fx.run(model, helpers)
    apply_lora(model, fx.bfl_keys(spec), name="a", scale=0.7)
    side = fx.run(model, helpers)
    remove_lora(model, "a")
    assert torch.equal(fx.run(model, helpers), base)
    report = apply_lora(model, fx.bfl_keys(spec), name="a", scale=0.7, fuse=True)
    assert report.fused and [r.name for r in list_loras(model)] == ["a"]
    assert not torch.equal(model.state_dict()["img_in.weight"], before["img_in.weight"])
    _assert_close(fx.run(model, helpers), side, what="fused vs side path")  # rounding only: W x + B A x vs (W + BA) x
    remove_lora(model, "a")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(fx.run(model, helpers), base) and list_loras(model) == []


def test_stacked_loras_add_up_and_remove_in_any_order(klein, helpers):
    one, two = _bfl_spec(klein, seed=17), _diffusers_spec(klein, seed=18)
    model = klein.load("bfl")
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, fx.bfl_keys(one), name="one", scale=0.7, fuse=True)
    apply_lora(model, fx.diffusers_keys(two), name="two", scale=-0.4, metadata=fx.peft_metadata(two))
    apply_lora(model, fx.bfl_keys(one), name="three", scale=0.5, fuse=True)
    both = fx.dense_reference(klein, helpers, diffusers_specs=[(two, -0.4)], bfl_specs=[(one, 1.2)])
    _assert_close(fx.run(model, helpers), fx.run(both, helpers), what="stack")
    remove_lora(model, "one")  # fused first: "three" is merged again onto the restored weights
    only = klein.load("bfl")
    apply_lora(only, fx.bfl_keys(one), scale=0.5, fuse=True)
    assert all(torch.equal(v, only.state_dict()[k]) for k, v in model.state_dict().items())
    remove_lora(model, "two")
    _assert_close(fx.run(model, helpers), fx.run(only, helpers), 1e-6, "after removing two")
    remove_lora(model, "three")
    assert all(torch.equal(v, base_weights[k]) for k, v in model.state_dict().items())


# --- q/k/v fusion


def _parts(seed, ranks=(2, 4, 3), alphas=(1.0, 8.0, None), features=(32, 32)):
    gen = torch.Generator().manual_seed(seed)
    return [
        None if r is None else LoraWeights(torch.randn(r, features[0], generator=gen),
                                           torch.randn(features[1], r, generator=gen), a)
        for r, a in zip(ranks, alphas)
    ]


def test_split_qkv_parts_fuse_exactly_and_split_back():
    parts = _parts(0)
    fused = fuse_lora_parts(parts)
    assert fused.down.shape == (9, 32) and fused.up.shape == (96, 9) and fused.factor == 1.0
    expected = torch.cat([p.delta_weight() for p in parts])
    _assert_close(fused.delta_weight(), expected, 1e-6, "fused")
    back = split_lora_parts(fused)
    assert [p.rank for p in back] == [2, 4, 3]
    for got, want in zip(back, parts):
        _assert_close(got.delta_weight(), want.delta_weight(), 1e-6, "split")
    same = fuse_lora_parts(_parts(1, ranks=(4, 4, 4), alphas=(2.0, 2.0, 2.0)))
    assert same.rank == 12 and same.alpha == 6.0  # rank and alpha scaled together, tensors untouched


def test_missing_parts_are_zero_and_dense_fused_loras_split_exactly():
    parts = _parts(2, ranks=(4, None, 2), alphas=(3.0, None, 5.0))
    fused = fuse_lora_parts(parts)
    assert torch.count_nonzero(fused.delta_weight()[32:64]) == 0
    back = split_lora_parts(fused)
    assert back[1] is None and back[0].rank == 4 and back[2].rank == 2
    dense = LoraWeights(torch.randn(4, 32), torch.randn(96, 4), 2.0)  # ai-toolkit/BFL: one rank for all three
    pieces = split_lora_parts(dense)
    _assert_close(torch.cat([p.delta_weight() for p in pieces]), dense.delta_weight(), 1e-6, "shared down")


# --- writers


@pytest.mark.parametrize("layout", ["diffusers", "comfy", "kohya", "diffsynth"])
def test_writers_round_trip(klein, tmp_path, layout):
    spec = _diffusers_spec(klein, seed=19)
    lora = load_lora(fx.diffusers_keys(spec), fx.peft_metadata(spec))[0].lora
    path = tmp_path / f"{layout}.safetensors"
    if layout == "diffsynth":
        from diffstudio_flux2.lora_formats import to_diffusers

        tensors, metadata = to_diffusers(lora, prefix="")
        save_file(tensors, str(path), metadata=metadata)
    else:
        save_lora_file(lora, path, layout=layout)
    tensors, metadata = read_lora_file(path)
    fmt = detect_lora_format(list(tensors))
    assert fmt.name == {"comfy": "flux2/bfl", "kohya": "flux2/kohya"}.get(layout, "flux2/diffusers")
    again, _, _ = load_lora(path)
    assert not again.unmatched
    _assert_same_deltas(again.lora, lora)
    if layout == "kohya":
        assert metadata["ss_network_dim"] == "4" and metadata["ss_base_model_version"] == "flux2"
        assert metadata["modelspec.architecture"].endswith("/lora") and float(metadata["ss_network_alpha"]) > 0
    if layout == "diffusers":  # split parts come back compact, with their own ranks
        assert tensors["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"].shape[0] == spec[
            "transformer_blocks.0.attn.to_k"].down.shape[0]
        config = json.loads(metadata["lora_adapter_metadata"])
        assert config["transformer.r"] == 4 and config["transformer.alpha_pattern"]


def test_diffusers_file_written_by_us_loads_in_diffusers(klein, helpers, tmp_path):
    # a fused BFL LoRA (mixed ranks and alphas) is split into to_q/to_k/to_v for diffusers
    lora = load_lora(fx.bfl_keys(_bfl_spec(klein, seed=20)))[0].lora
    path = save_lora_file(lora, tmp_path / "pytorch_lora_weights.safetensors")
    model = klein.load("bfl")
    apply_lora(model, lora, name="ours")
    _assert_close(fx.run(model, helpers), fx.diffusers_output(klein, helpers, str(path)), what="diffusers")


@pytest.mark.parametrize("layout", ["kohya", "comfy"])
def test_kohya_and_comfy_files_written_by_us_load_in_diffusers(klein, helpers, tmp_path, layout):
    # diffusers' kohya and ai-toolkit readers know no final-norm LoRA and (kohya) no modulation LoRA, and the
    # ai-toolkit one reads no alphas: write what they can read
    exclude = ("final_layer.adaLN_modulation", "modulation") if layout == "kohya" else ("final_layer.adaLN",)
    lora = load_lora(fx.bfl_keys(_bfl_spec(klein, seed=24, exclude=exclude, alphas=layout == "kohya")))[0].lora
    path = save_lora_file(lora, tmp_path / f"{layout}.safetensors", layout=layout)
    model = klein.load("bfl")
    apply_lora(model, path)
    got = fx.run(model, helpers)
    _assert_close(got, fx.diffusers_output(klein, helpers, str(path)), what=f"{layout} file in diffusers")
    assert (got - fx.run(klein.load("bfl"), helpers)).abs().max() > 0.1


def test_writer_rejects_unknown_modules():
    from diffstudio_flux2.lora_formats import LoraFormatError

    with pytest.raises(LoraFormatError, match="not a LoRA-capable layer"):
        save_lora_file({"double_blocks.0.img_attn.norm.query_norm": LoraWeights(torch.zeros(1, 4), torch.zeros(4, 1))},
                       "/nonexistent/x.safetensors")
    with pytest.raises(ValueError, match="unknown LoRA layout"):
        save_lora_file({}, "/nonexistent/x.safetensors", layout="lycoris")


# --- reports and errors


def test_unknown_keys_are_reported_and_logged(klein, caplog):
    spec = _bfl_spec(klein, seed=21, exclude=("single_blocks",))
    sd = fx.bfl_keys(spec)
    extra = {
        "diffusion_model.double_blocks.0.img_attn.norm.query_norm.lora_A.weight": torch.zeros(2, 16),
        "diffusion_model.double_blocks.0.img_attn.qkv.dora_scale": torch.ones(96, 1),
        "diffusion_model.single_blocks.0.linear1.lora_A.weight": torch.zeros(2, 32),  # no lora_B
        "lora_te1_text_model.lora_down.weight": torch.zeros(2, 4),
    }
    model = klein.load("bfl")
    with caplog.at_level(logging.WARNING, logger="diffstudio_flux2.lora"):
        report = apply_lora(model, {**sd, **extra}, name="partial")
    assert sorted(report.unmatched_keys) == sorted(extra)
    assert report.tensors_matched == len(sd) and report.modules_matched == len(spec)
    assert "4 of its keys were not applied" in caplog.text and "dora_scale" in caplog.text
    text = str(report)
    assert "'partial'" in text and "flux2/bfl" in text and "4 keys were not applied" in text


def test_lora_for_layers_the_model_lacks(dit_cases, klein):
    spec = _bfl_spec(dit_cases["dev"], seed=22)
    guidance_only = {n: p for n, p in spec.items() if n.startswith("guidance_in.")}
    with pytest.raises(LoraMatchError, match="matches none of the model's layers") as info:
        apply_lora(klein.load("bfl"), fx.bfl_keys(guidance_only))
    assert "guidance_in.in_layer" in str(info.value) and "double_blocks.0" in str(info.value)
    report = apply_lora(klein.load("bfl"), fx.bfl_keys(spec))
    assert any(key.startswith("diffusion_model.guidance_in.") for key in report.unmatched_keys)
    wrong = {"double_blocks.0.img_mlp.2": LoraWeights(torch.zeros(2, 8), torch.zeros(32, 2))}
    with pytest.raises(LoraMatchError, match="other sizes"):
        apply_lora(klein.load("bfl"), wrong)


def test_detection_errors():
    with pytest.raises(UnknownLoraFormatError) as info:
        detect_lora_format(["lora_te_text_model.encoder.lora_A.weight", "input_blocks.1.lora_B.weight"])
    message = str(info.value)
    assert "input_blocks.1.lora_B.weight" in message and "flux2/kohya" in message and "flux2/diffusers" in message
    assert issubclass(UnknownLoraFormatError, CheckpointError)
    with pytest.raises(AmbiguousLoraFormatError):
        detect_lora_format(
            ["double_blocks.0.img_attn.qkv.lora_A.weight", "transformer_blocks.0.attn.to_q.lora_A.weight"]
        )
    assert detect_lora_format(["transformer_blocks.0.attn.to_q.lora_A.default.weight"]).name == "flux2/diffusers"


def test_files_are_read_safely(tmp_path, klein):
    pickle = tmp_path / "lora.ckpt"
    torch.save({"a": torch.zeros(1)}, pickle)
    with pytest.raises(PickleRefusedError):
        apply_lora(klein.load("bfl"), pickle)
    corrupt = tmp_path / "corrupt.safetensors"
    save_file({"diffusion_model.img_in.lora_A.weight": torch.zeros(4, 16)}, str(corrupt))
    corrupt.write_bytes(corrupt.read_bytes()[:-8])
    with pytest.raises(SafetensorsFormatError):
        read_lora_file(corrupt)


def test_names_and_formats(klein):
    model = klein.load("bfl")
    lora = {"img_in": LoraWeights(torch.randn(2, 16), torch.randn(32, 2))}
    assert apply_lora(model, lora).name == "lora" and apply_lora(model, lora).name == "lora_2"
    with pytest.raises(LoraNameError, match="already applied"):
        apply_lora(model, lora, name="lora")
    with pytest.raises(LoraNameError, match="no LoRA named 'nope'"):
        remove_lora(model, "nope")
    formats = lora_formats()
    assert [f.name for f in formats] == ["flux2/diffusers", "flux2/bfl", "flux2/kohya"]
    assert all(f.family == "flux2" and f.from_canonical is not None for f in formats)
    sd, _ = formats[2].from_canonical(lora)
    assert formats[2].to_canonical(sd).keys() == lora.keys()
