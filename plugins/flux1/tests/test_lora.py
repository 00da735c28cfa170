"""FLUX.1 LoRAs in every supported layout give the DiT output of diffusers' load_lora_weights (<= 1e-4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffstudio.nn import delta_linears
from diffstudio.runtime import Runtime
from diffstudio.testing import import_file
from diffstudio_flux1.lora import LoraMatchError, LoraNameError, UnknownLoraFormatError, apply_lora, remove_lora
from diffstudio_flux1.lora_formats import DIT_DOUBLE, DIT_SINGLE, layouts
from safetensors.torch import save_file

RANK = 4
_BLOCK_LAYERS = (
    *("img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2", "img_mod.lin"),
    *("txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2", "txt_mod.lin"),
    *("linear1", "linear2", "modulation.lin"),
)


def _pair(gen: torch.Generator, fan_in: int, fan_out: int, rank: int = RANK) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rank, fan_in, generator=gen) / fan_in**0.5, 0.3 * torch.randn(fan_out, rank, generator=gen)


def diffusers_lora(reference: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A LoRA on every Linear of a diffusers FluxTransformer2DModel, diffusers keys."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, module in reference.named_modules():
        if isinstance(module, torch.nn.Linear):
            down, up = _pair(gen, module.in_features, module.out_features)
            out[f"transformer.{name}.lora_A.weight"], out[f"transformer.{name}.lora_B.weight"] = down, up
    return out


def bfl_lora(
    model: torch.nn.Module, key: Any, seed: int = 1, alpha: float = 2.0, skip: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """A LoRA on the block layers of our DiT: ``key(path)`` names the module (kohya or ComfyUI style)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for path, layer in delta_linears(model):
        if path.split(".", 2)[-1] not in _BLOCK_LAYERS or path.split(".", 2)[-1] in skip:
            continue
        down, up = _pair(gen, layer.in_features, layer.out_features)
        name = key(path)
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def xlabs_lora(model: torch.nn.Module, seed: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    d, out = model.hidden_size, {}
    for i in range(len(model.double_blocks)):
        for name, rows in (("qkv_lora1", 3 * d), ("proj_lora1", d), ("qkv_lora2", 3 * d), ("proj_lora2", d)):
            (
                out[f"double_blocks.{i}.processor.{name}.down.weight"],
                out[f"double_blocks.{i}.processor.{name}.up.weight"],
            ) = _pair(gen, d, rows)
    for i, block in enumerate(model.single_blocks):
        qkv, proj = _pair(gen, d, 3 * d), _pair(gen, block.linear2.in_features, d)
        (
            out[f"single_blocks.{i}.processor.qkv_lora.down.weight"],
            out[f"single_blocks.{i}.processor.qkv_lora.up.weight"],
        ) = qkv
        (
            out[f"single_blocks.{i}.processor.proj_lora.down.weight"],
            out[f"single_blocks.{i}.processor.proj_lora.up.weight"],
        ) = proj
    return out


def _reference(case: Any, helpers: Any, path: Path, inp: dict[str, Any]) -> torch.Tensor:
    from diffusers import FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(str(case.files["diffusers"])).eval()
    pipe = FluxPipeline(
        scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        transformer=transformer,
    )  # fmt: skip
    pipe.load_lora_weights(str(path))
    return helpers.run_reference(transformer, inp, case.guidance)


def _layout(case: Any, layout: str, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    model = case.load("bfl")
    if layout == "diffusers":
        return diffusers_lora(case.reference)
    if layout == "peft":
        peft = {
            f"base_model.model.{k.removeprefix('transformer.')}": v for k, v in diffusers_lora(case.reference).items()
        }
        return {
            k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
            for k, v in peft.items()
        }
    if layout == "kohya":
        return bfl_lora(model, lambda p: "lora_unet_" + p.replace(".", "_"), skip=skip)
    if layout == "comfy":
        return bfl_lora(model, lambda p: "diffusion_model." + p, skip=skip)
    return xlabs_lora(model)


@pytest.mark.parametrize("layout", ["diffusers", "kohya", "comfy", "xlabs"])
def test_lora_matches_diffusers_load_lora_weights(dit_cases, helpers, tmp_path, layout):
    case = dit_cases["dev"]
    path = tmp_path / f"{layout}.safetensors"
    # diffusers' kohya converter splits single-block linear1 with FLUX.1-dev's fixed sizes (3072, ..., 12288), so
    # the tiny model's linear1 LoRAs are compared through the diffusers layout (to_q/to_k/to_v/proj_mlp) only
    save_file(_layout(case, layout, skip=("linear1",)), str(path))
    inp = helpers.dit_inputs()
    expected = _reference(case, helpers, path, inp)
    model = case.load("bfl")
    with torch.no_grad():
        base = model(**inp)
        report = apply_lora(model, path)
        side = model(**inp)
        assert not report.unmatched_keys and report.modules_matched > 0 and not report.fused
        remove_lora(model, report.name)
        assert torch.equal(model(**inp), base)
        fused_report = apply_lora(model, path, fuse=True)
        fused = model(**inp)
        remove_lora(model, fused_report.name)
        restored = model(**inp)
    diff = (side - expected).abs().max().item()
    assert diff <= helpers.TOL, f"{layout}: side path differs from diffusers by {diff}"
    assert (fused - expected).abs().max() <= helpers.TOL and (side - base).abs().max() > 1e-2
    assert torch.equal(restored, base)


def test_the_diffusers_writer_loads_in_diffusers_with_our_output(dit_cases, helpers, tmp_path):
    """A LoRA on every block layer (fused q/k/v and linear1 included, alpha != rank) written in the diffusers
    layout: diffusers' ``load_lora_weights`` on that file equals our side path of the original (<= 1e-4)."""
    case = dit_cases["dev"]
    model = case.load("bfl")
    source = tmp_path / "comfy.safetensors"
    save_file(bfl_lora(model, lambda p: "diffusion_model." + p, seed=3, alpha=2.0), str(source))
    formats = {fmt.name: fmt for fmt in layouts()}
    from safetensors.torch import load_file

    canonical = formats["flux1/bfl"].to_canonical(load_file(str(source))).lora
    tensors, metadata = formats["flux1/diffusers"].from_canonical(canonical)
    assert any(".attn.to_q.lora_A." in k for k in tensors) and any(".proj_mlp.lora_B." in k for k in tensors)
    written = tmp_path / "diffusers.safetensors"
    save_file(tensors, str(written), metadata=metadata or None)
    inp = helpers.dit_inputs()
    expected = _reference(case, helpers, written, inp)
    with torch.no_grad():
        report = apply_lora(model, source)
        ours = model(**inp)
        remove_lora(model, report.name)
        reread = apply_lora(model, written)
        again = model(**inp)
    assert not reread.unmatched_keys
    diff = (ours - expected).abs().max().item()
    assert diff <= helpers.TOL, f"diffusers on our diffusers-layout file differs from our side path by {diff}"
    assert (again - ours).abs().max() <= 1e-5


def test_peft_and_diffsynth_layouts_equal_their_diffusers_and_bfl_forms(dit_cases, helpers):
    case = dit_cases["dev"]
    inp = helpers.dit_inputs()
    results = {}
    kohya = _layout(case, "kohya")
    diffsynth_names = {**{v: k for k, v in {"attn.a_to_qkv": "img_attn.qkv", "attn.b_to_qkv": "txt_attn.qkv",
                          "attn.a_to_out": "img_attn.proj", "attn.b_to_out": "txt_attn.proj", "ff_a.0": "img_mlp.0",
                          "ff_a.2": "img_mlp.2", "ff_b.0": "txt_mlp.0", "ff_b.2": "txt_mlp.2",
                          "norm1_a.linear": "img_mod.lin", "norm1_b.linear": "txt_mod.lin"}.items()}}  # fmt: skip
    diffsynth = {}
    paths = [path for path, _ in delta_linears(case.load("bfl"))]
    for key, value in kohya.items():
        module, kind = key.split(".", 1)
        for path in paths:
            if "lora_unet_" + path.replace(".", "_") == module:
                block, index, inner = path.split(".", 2)
                inner = diffsynth_names.get(inner, {"linear1": "to_qkv_mlp", "linear2": "proj_out",
                                                    "modulation.lin": "norm.linear"}.get(inner, inner))  # fmt: skip
                new = f"{'blocks' if block == 'double_blocks' else 'single_blocks'}.{index}.{inner}"
                suffix = {"lora_down.weight": "lora_A.default.weight", "lora_up.weight": "lora_B.default.weight"}
                diffsynth[f"{new}.{suffix.get(kind, kind)}"] = value
    for name, sd in (("diffusers", _layout(case, "diffusers")), ("peft", _layout(case, "peft")),
                     ("kohya", kohya), ("diffsynth", diffsynth)):  # fmt: skip
        model = case.load("bfl")
        report = apply_lora(model, sd)
        assert not report.unmatched_keys, (name, report.unmatched_keys[:3])
        with torch.no_grad():
            results[name] = (model(**inp), report.format)
    assert (results["peft"][0] - results["diffusers"][0]).abs().max() <= helpers.TOL
    assert (results["diffsynth"][0] - results["kohya"][0]).abs().max() <= helpers.TOL
    assert [r[1] for r in results.values()] == ["flux1/diffusers"] * 2 + ["flux1/kohya", "flux1/diffsynth"]


def test_split_qkv_loras_fuse_exactly_with_rank_and_alpha_scaled_together():
    from diffstudio_flux1.lora_formats import PARSERS

    gen = torch.Generator().manual_seed(3)
    parts = {n: _pair(gen, 8, 8, rank=2) for n in ("to_q", "to_k", "to_v")}
    sd = {}
    for n, (down, up) in parts.items():
        sd[f"transformer_blocks.0.attn.{n}.lora_A.weight"], sd[f"transformer_blocks.0.attn.{n}.lora_B.weight"] = (
            down,
            up,
        )
        sd[f"transformer_blocks.0.attn.{n}.alpha"] = torch.tensor(1.0)
    fused = PARSERS["flux1/diffusers"](sd).lora["double_blocks.0.img_attn.qkv"]
    assert (fused.rank, fused.alpha) == (6, 3.0)
    expected = torch.cat([0.5 * up @ down for down, up in parts.values()])
    assert torch.allclose(fused.delta_weight(), expected, atol=1e-6)


def test_match_report_errors_and_names(dit_cases, tmp_path):
    case = dit_cases["schnell"]
    model = case.load("bfl")
    sd = _layout(case, "kohya")
    sd["lora_unet_unknown_layer.lora_down.weight"] = torch.zeros(RANK, 4)
    sd["lora_unet_unknown_layer.lora_up.weight"] = torch.zeros(4, RANK)
    report = apply_lora(model, sd, name="style", scale=0.5)
    assert report.unmatched_keys == [
        "lora_unet_unknown_layer.lora_down.weight",
        "lora_unet_unknown_layer.lora_up.weight",
    ]
    assert report.modules["double_blocks.*.img_attn.qkv"] == 2 and "2 keys were not applied" in str(report)
    with pytest.raises(LoraNameError, match="already applied"):
        apply_lora(model, sd, name="style")
    remove_lora(model, "style")
    with pytest.raises(LoraNameError, match="no LoRA named"):
        remove_lora(model, "style")
    nothing = {"lora_unet_nope.lora_down.weight": torch.zeros(2, 3), "lora_unet_nope.lora_up.weight": torch.zeros(3, 2)}
    with pytest.raises(LoraMatchError, match="matches none"):
        apply_lora(model, nothing)
    with pytest.raises(UnknownLoraFormatError, match="not a FLUX.1 LoRA"):
        apply_lora(model, {"double_stream_modulation_img.lin.lora_A": torch.zeros(2, 2)})
    wrong = {k: v[:, :3] if "down" in k else v for k, v in sd.items() if "unknown" not in k}
    with pytest.raises(LoraMatchError, match="does not fit"):
        apply_lora(model, wrong)


def test_kohya_text_encoder_layers_reach_clip(tmp_path):
    fx = import_file(Path(__file__).with_name("fixtures_text.py"))
    clip = fx.build_clip_encoder(tmp_path / "clip", 50)
    from diffstudio_flux1.model import Flux
    from diffstudio_flux1.params import FluxParams

    dit = Flux(FluxParams(hidden_size=64, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=(4, 14, 14)))
    gen = torch.Generator().manual_seed(4)
    down, up = _pair(gen, fx.CLIP_HIDDEN, fx.CLIP_HIDDEN)
    sd = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": down,
          "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": up,
          "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.zeros(RANK, 64),
          "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.zeros(64, RANK)}  # fmt: skip
    ids = torch.tensor([[0, 5, 6, 7, 1]])
    with torch.no_grad():
        base = clip(ids).pooler_output
        without = apply_lora(dit, sd, name="a")
        report = apply_lora(dit, sd, name="b", text_encoder=clip)
        changed = clip(ids).pooler_output
        layer = clip.encoder.layers[0].self_attn.q_proj
        remove_lora(dit, "b", text_encoder=clip)
        restored = clip(ids).pooler_output
    assert len(without.unmatched_keys) == 2 and not report.unmatched_keys
    assert "text_encoder.encoder.layers.*.self_attn.q_proj" in report.modules
    assert (changed - base).abs().max() > 1e-3 and torch.allclose(restored, base, atol=1e-6) and not layer.deltas


def test_layouts_are_registered_and_exclusive():
    names = {fmt.name for fmt in Runtime().hooks.lora_formats() if fmt.family == "flux1"}
    assert names == {"flux1/diffusers", "flux1/kohya", "flux1/bfl", "flux1/xlabs", "flux1/diffsynth"}
    examples = [
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight",
        "double_blocks.0.processor.qkv_lora1.down.weight",
        "blocks.0.attn.a_to_qkv.lora_A.default.weight",
    ]
    for key in examples:
        assert [fmt.name for fmt in layouts() if fmt.detect([key])].__len__() == 1, key
    assert set(DIT_DOUBLE) and set(DIT_SINGLE)
