"""With FLUX.1 and FLUX.2 installed, every checkpoint of either family is claimed by exactly one plugin.

FLUX.2 files are written with diffusers and transformers alone (BFL names through the converter FLUX.2
registers), so this test needs no import of the FLUX.2 plugin: both plugins answer through the runtime.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffstudio import ModelConfig
from diffstudio.loading import Checkpoint
from diffstudio.runtime import Runtime
from diffstudio.testing import import_file
from safetensors.torch import save_file


def _flux2_files(root: Path, runtime: Runtime) -> dict[str, Path]:
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    dit = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, timestep_guidance_channels=256, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True,
    )  # fmt: skip
    dit.save_pretrained(root / "flux2-transformer")
    from safetensors.torch import load_file

    to_bfl = runtime.hooks.converters().get("convert_flux2_dit_diffusers_to_bfl")
    bfl = to_bfl(load_file(root / "flux2-transformer" / "diffusion_pytorch_model.safetensors"))
    save_file({k: v.contiguous() for k, v in bfl.items()}, str(root / "flux2-dev.safetensors"))
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64), layers_per_block=1, latent_channels=8, norm_num_groups=32, sample_size=32,
    )  # fmt: skip
    vae.save_pretrained(root / "flux2-vae")
    to_bfl_vae = runtime.hooks.converters().get("convert_flux2_vae_diffusers_to_bfl")
    ae = to_bfl_vae(load_file(root / "flux2-vae" / "diffusion_pytorch_model.safetensors"))
    save_file({k: v.contiguous() for k, v in ae.items()}, str(root / "flux2-ae.safetensors"))
    qwen = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
        )  # fmt: skip
    )
    qwen.save_pretrained(root / "qwen3")
    return {
        "flux2 dit (diffusers)": root / "flux2-transformer",
        "flux2 dit (bfl)": root / "flux2-dev.safetensors",
        "flux2 vae (diffusers)": root / "flux2-vae",
        "flux2 vae (bfl)": root / "flux2-ae.safetensors",
        "flux2 text encoder (qwen3)": root / "qwen3",
    }


def _claims(runtime: Runtime, path: Path) -> list[str]:
    from diffstudio.loading.sources import WEIGHT_SUFFIXES

    files = sorted(p for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES) if path.is_dir() else [path]
    with Checkpoint.open(files) as checkpoint:
        return [
            f"{c.family}:{c.model_type}:{c.plugin}"
            for c in runtime.hooks.load_model(checkpoint, ModelConfig(path=str(path)))
        ]


def test_each_checkpoint_is_claimed_by_exactly_one_family(tmp_path: Path, dit_cases, vae_case, helpers) -> None:
    pytest.importorskip("diffstudio_flux2", reason="a cross-family check: flux2 is not a dependency of flux1")
    fx = import_file(Path(__file__).with_name("fixtures_text.py"))
    clip = fx.build_clip_tokenizer(tmp_path / "tok")
    fx.build_clip_encoder(tmp_path / "clip-legacy", clip, legacy=True)
    fx.build_clip_encoder(tmp_path / "clip-t5layout", clip, legacy=False)
    fx.build_t5_encoder(tmp_path / "t5", fx.build_t5_tokenizer(tmp_path / "tok2"))

    runtime = Runtime()
    assert {"flux1", "flux2"} <= set(runtime.hooks.families_asked())
    expected = {
        **{f"flux2:{name}": (path, "flux2") for name, path in _flux2_files(tmp_path, runtime).items()},
        "flux1 dit (bfl)": (dit_cases["dev"].files["bfl"], "flux1"),
        "flux1 dit (diffusers, sharded)": (dit_cases["schnell"].files["diffusers-sharded"], "flux1"),
        "flux1 vae (bfl)": (vae_case.files["bfl"], "flux1"),
        "flux1 vae (diffusers)": (vae_case.files["diffusers"], "flux1"),
        "clip (legacy keys)": (tmp_path / "clip-legacy", "flux1"),
        "clip (transformers-5 keys)": (tmp_path / "clip-t5layout", "flux1"),
        "t5 (sharded)": (tmp_path / "t5", "flux1"),
    }
    for name, (path, family) in expected.items():
        claims = _claims(runtime, path)
        assert len(claims) == 1 and claims[0].startswith(f"{family}:"), f"{name}: claims {claims}"


def test_registries_hold_the_flux1_entries() -> None:
    runtime = Runtime()
    assert "flux1" in runtime.hooks.pipelines().names()
    names = runtime.hooks.converters().names()
    assert {"convert_flux1_dit_bfl_to_diffusers", "convert_flux1_vae_diffusers_to_bfl"} <= set(names)
    assert runtime.hooks.converters().owner("convert_flux1_dit_bfl_to_diffusers") == "flux1"
    sd = {"img_in.weight": torch.zeros(8, 4), "final_layer.adaLN_modulation.1.bias": torch.arange(16.0)}
    out = runtime.hooks.converters().get("convert_flux1_dit_bfl_to_diffusers")(sd)
    assert torch.equal(out["norm_out.linear.bias"], torch.cat([torch.arange(8.0, 16.0), torch.arange(8.0)]))
