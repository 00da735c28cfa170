"""A FLUX.1 checkpoint given to Flux2ImagePipeline gets a typed error that names FLUX.1.

The FLUX.1 files are written here with FLUX.1's real key names (BFL single file, ComfyUI prefix, diffusers folder,
autoencoder) and tiny shapes. With no FLUX.1 family installed, the error says what the file is from its key patterns;
with a FLUX.1 family installed (here a small stand-in plugin that claims such files), core's family check refuses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffstudio import ModelConfig, hookimpl
from diffstudio.errors import UnknownCheckpointError
from diffstudio.pipeline.base import WrongFamilyError
from diffstudio.runtime import Runtime
from diffstudio.types import ModelClaim
from diffstudio_flux2.loaders import NotFlux2CheckpointError
from diffstudio_flux2.pipeline import Flux2ImagePipeline
from safetensors.torch import save_file

D, MLP, IN, CTX, POOLED = 32, 128, 64, 48, 40


def _linear(sd: dict[str, torch.Tensor], name: str, fan_in: int, fan_out: int) -> None:
    sd[f"{name}.weight"] = torch.zeros(fan_out, fan_in)
    sd[f"{name}.bias"] = torch.zeros(fan_out)


def flux1_bfl_dit(guidance: bool = True, prefix: str = "") -> dict[str, torch.Tensor]:
    """A 1 + 1 block FLUX.1 DiT with the key names of flux1-dev.safetensors (biases, per-block modulation)."""
    sd: dict[str, torch.Tensor] = {}
    _linear(sd, "img_in", IN, D)
    _linear(sd, "txt_in", CTX, D)
    for name, fan_in in (("time_in", 256), ("vector_in", POOLED)) + ((("guidance_in", 256),) if guidance else ()):
        _linear(sd, f"{name}.in_layer", fan_in, D)
        _linear(sd, f"{name}.out_layer", D, D)
    for stream in ("img", "txt"):
        block = f"double_blocks.0.{stream}"
        _linear(sd, f"{block}_mod.lin", D, 6 * D)
        _linear(sd, f"{block}_attn.qkv", D, 3 * D)
        _linear(sd, f"{block}_attn.proj", D, D)
        sd[f"{block}_attn.norm.query_norm.scale"] = torch.ones(16)
        sd[f"{block}_attn.norm.key_norm.scale"] = torch.ones(16)
        _linear(sd, f"{block}_mlp.0", D, MLP)
        _linear(sd, f"{block}_mlp.2", MLP, D)
    _linear(sd, "single_blocks.0.linear1", D, 3 * D + MLP)
    _linear(sd, "single_blocks.0.linear2", D + MLP, D)
    _linear(sd, "single_blocks.0.modulation.lin", D, 3 * D)
    sd["single_blocks.0.norm.query_norm.scale"] = torch.ones(16)
    sd["single_blocks.0.norm.key_norm.scale"] = torch.ones(16)
    _linear(sd, "final_layer.linear", D, IN)
    _linear(sd, "final_layer.adaLN_modulation.1", D, 2 * D)
    return {prefix + k: v for k, v in sd.items()}


def flux1_ae() -> dict[str, torch.Tensor]:
    """The encoder/decoder ends of FLUX.1's ae.safetensors: 16 latent channels (32 moments), no BatchNorm."""
    return {
        "encoder.conv_in.weight": torch.zeros(8, 3, 3, 3),
        "encoder.conv_in.bias": torch.zeros(8),
        "encoder.norm_out.weight": torch.ones(8),
        "encoder.conv_out.weight": torch.zeros(32, 8, 3, 3),
        "encoder.conv_out.bias": torch.zeros(32),
        "decoder.conv_in.weight": torch.zeros(8, 16, 3, 3),
        "decoder.conv_out.weight": torch.zeros(3, 8, 3, 3),
    }


def flux1_diffusers(folder: Path) -> None:
    from diffusers import FluxTransformer2DModel

    FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
    ).save_pretrained(folder)  # fmt: skip


def _flux2_only() -> Runtime:
    return Runtime(env={"DIFFSTUDIO_LOAD_PLUGINS": "flux2"})


def _load(path: Path, runtime: Runtime) -> Any:
    return Flux2ImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", model_configs=[ModelConfig(path=str(path))], runtime=runtime
    )


CASES = {
    "bfl-dev": (lambda: flux1_bfl_dit(), "FLUX.1-dev-style DiT (BFL single-file layout)"),
    "bfl-schnell": (lambda: flux1_bfl_dit(guidance=False), "FLUX.1-schnell-style DiT"),
    "comfy": (lambda: flux1_bfl_dit(prefix="model.diffusion_model."), "DiT (ComfyUI layout)"),
    "ae": (flux1_ae, "16-channel autoencoder"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_flux1_file_is_named_when_no_family_claims_it(tmp_path: Path, case: str) -> None:
    build, detected = CASES[case]
    path = tmp_path / "flux1.safetensors"
    save_file(build(), str(path))
    with pytest.raises(NotFlux2CheckpointError) as info:
        _load(path, _flux2_only())
    message = str(info.value)
    assert detected in message and "not a FLUX.2 model" in message and "flux2" in info.value.families_asked
    assert str(path) in message and isinstance(info.value, UnknownCheckpointError)
    assert info.value.evidence and all(key in message for key in info.value.evidence)


def test_a_flux1_diffusers_folder_is_named(tmp_path: Path) -> None:
    flux1_diffusers(tmp_path / "transformer")
    with pytest.raises(NotFlux2CheckpointError, match=r"FLUX\.1 DiT \(diffusers FluxTransformer2DModel layout\)"):
        _load(tmp_path / "transformer", _flux2_only())


def test_other_unknown_files_keep_the_core_error(tmp_path: Path) -> None:
    path = tmp_path / "unet.safetensors"
    save_file({"input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(path))
    with pytest.raises(UnknownCheckpointError) as info:
        _load(path, _flux2_only())
    assert not isinstance(info.value, NotFlux2CheckpointError) and "input_blocks" in str(info.value)


class StandInFlux1Family:
    """What a FLUX.1 family plugin answers for a BFL FLUX.1 DiT (its claim only; nothing is built)."""

    @hookimpl
    def load_model(self, checkpoint: Any, config: Any) -> ModelClaim | None:
        if "vector_in.in_layer.weight" not in checkpoint.keys():
            return None
        return ModelClaim("flux1", "flux1-dit/dev", "dit", "bfl", lambda *_: None)


def test_a_flux1_file_claimed_by_its_family_is_refused_by_the_family_check(tmp_path: Path) -> None:
    path = tmp_path / "flux1-dev.safetensors"
    save_file(flux1_bfl_dit(), str(path))
    runtime = Runtime(env={"DIFFSTUDIO_LOAD_PLUGINS": "flux2"}, plugins=[StandInFlux1Family()])
    with pytest.raises(WrongFamilyError, match=r"flux1-dit/dev checkpoint of the 'flux1' family"):
        _load(path, runtime)
