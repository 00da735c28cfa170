"""LoRA files that must not change a FLUX.2 DiT (finding 21.6 of issue 21).

Before: a NaN or infinite alpha, or NaN matrices, gave a NaN image with exit 0; a FLUX.1 attention LoRA loaded into
FLUX.2 with no warning, because FLUX.1-dev and FLUX.2-klein-4B share BFL layer names and widths. Decision: refuse
(typed) a LoRA whose metadata names another base model, one that names FLUX.1-only layers, and one that names
block indices beyond the model's depth.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffstudio.errors import CheckpointError
from diffstudio.lora import LoraAlphaError, LoraArchitectureError, LoraBaseModelError, LoraNonFiniteError
from diffstudio_flux2.lora import LoraFormatError, apply_lora, list_loras
from diffstudio_flux2.model import Flux2
from diffstudio_flux2.params import Flux2Params
from safetensors.torch import save_file
from torch import Tensor

PARAMS = Flux2Params(
    in_channels=16, context_in_dim=24, hidden_size=32, num_heads=2, depth=2, depth_single_blocks=2,
    axes_dim=(4, 4, 4, 4), mlp_ratio=3.0, use_guidance_embed=False,
)  # fmt: skip


@pytest.fixture
def dit() -> Flux2:
    torch.manual_seed(0)
    return Flux2(PARAMS)


def attention_lora(blocks: range, rank: int = 2, alpha: Tensor | None = None) -> dict[str, Tensor]:
    """A BFL-named attention LoRA for 32-wide blocks: what FLUX.1 and FLUX.2 files both look like."""
    state: dict[str, Tensor] = {}
    for i in blocks:
        name = f"diffusion_model.double_blocks.{i}.img_attn.qkv"
        state[f"{name}.lora_A.weight"] = torch.randn(rank, 32)
        state[f"{name}.lora_B.weight"] = torch.randn(96, rank)
        if alpha is not None:
            state[f"{name}.alpha"] = alpha.clone()
    return state


def save(tmp_path: Path, state: dict[str, Tensor], metadata: dict[str, str] | None = None) -> Path:
    path = tmp_path / "lora.safetensors"
    save_file(state, str(path), metadata=metadata)
    return path


def test_matching_lora_applies(dit: Flux2, tmp_path: Path) -> None:
    report = apply_lora(dit, save(tmp_path, attention_lora(range(2), alpha=torch.tensor(4.0))))
    assert report.modules_matched == 2


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_lora_alpha_nan_or_inf_is_refused(dit: Flux2, tmp_path: Path, value: float) -> None:
    with pytest.raises(LoraAlphaError, match="double_blocks.0.img_attn.qkv.alpha"):
        apply_lora(dit, save(tmp_path, attention_lora(range(1), alpha=torch.tensor(value))))
    assert not list_loras(dit)


def test_lora_alpha_of_shape_2_is_refused(dit: Flux2, tmp_path: Path) -> None:
    with pytest.raises(LoraAlphaError, match=r"shape \[2\]"):
        apply_lora(dit, save(tmp_path, attention_lora(range(1), alpha=torch.tensor([4.0, 8.0]))))


@pytest.mark.parametrize(
    "config",
    [
        {"lora_alpha": "NaN"},
        {"lora_alpha": "abc"},
        {"lora_alpha": 1e400},
        {"alpha_pattern": ["x"]},
        {"alpha_pattern": {"(a+)+b": 4}},
        {"lora_alpha": [1]},
    ],  # fmt: skip
    ids=["nan-string", "text", "inf", "pattern-list", "nested-quantifier", "list"],
)
def test_peft_metadata_alpha_must_be_a_finite_number(dit: Flux2, config: dict[str, object]) -> None:
    state = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, 32),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(32, 2),
    }
    metadata = {"lora_adapter_metadata": json.dumps(config).replace("Infinity", "1e400")}
    with pytest.raises(CheckpointError):
        apply_lora(dit, state, metadata=metadata)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_lora_matrices_are_refused(dit: Flux2, tmp_path: Path, bad: float) -> None:
    state = attention_lora(range(2))
    state["diffusion_model.double_blocks.1.img_attn.qkv.lora_B.weight"][3, 1] = bad
    with pytest.raises(LoraNonFiniteError, match="double_blocks.1.img_attn.qkv"):
        apply_lora(dit, save(tmp_path, state))


def test_flux1_attention_lora_with_more_blocks_is_refused(dit: Flux2, tmp_path: Path) -> None:
    # a FLUX.1-dev attention LoRA names double blocks 0-18; klein-4B has 5 of the same shapes (here: 2 of 32 wide)
    with pytest.raises(LoraArchitectureError, match="double_blocks up to index 18, the model has 2"):
        apply_lora(dit, save(tmp_path, attention_lora(range(19))))
    assert not list_loras(dit)


@pytest.mark.parametrize(
    "metadata",
    [
        {"modelspec.architecture": "flux-1-dev/lora"},
        {"ss_base_model_version": "flux1"},
        {"ss_base_model_version": "sdxl_base_v1-0"},
    ],  # fmt: skip
)
def test_lora_whose_metadata_names_another_base_model_is_refused(
    dit: Flux2, tmp_path: Path, metadata: dict[str, str]
) -> None:
    with pytest.raises(LoraBaseModelError, match="metadata says"):
        apply_lora(dit, save(tmp_path, attention_lora(range(2)), metadata))
    ok = {"modelspec.architecture": "flux-2-klein-4b/lora", "ss_base_model_version": "flux2"}
    assert apply_lora(dit, save(tmp_path, attention_lora(range(2)), ok)).modules_matched == 2


def test_lora_naming_flux1_only_layers_is_refused(dit: Flux2, tmp_path: Path) -> None:
    state = attention_lora(range(2))
    state["lora_unet_double_blocks_0_img_mod_lin.lora_down.weight"] = torch.randn(2, 32)
    state["lora_unet_double_blocks_0_img_mod_lin.lora_up.weight"] = torch.randn(192, 2)
    kohya = {}
    for key, value in state.items():
        if key.startswith("diffusion_model."):
            module, role = key.removeprefix("diffusion_model.").rsplit(".lora_", 1)
            key = (
                "lora_unet_"
                + module.replace(".", "_")
                + (".lora_down.weight" if role == "A.weight" else ".lora_up.weight")
            )
        kohya[key] = value
    with pytest.raises(LoraArchitectureError, match="FLUX.1 layers"):
        apply_lora(dit, save(tmp_path, kohya))


def test_complex_lora_source_type_is_typed(dit: Flux2) -> None:
    with pytest.raises(LoraFormatError):
        apply_lora(dit, 42)  # type: ignore[arg-type]


def test_deeply_nested_lora_header_is_a_typed_error(dit: Flux2, tmp_path: Path) -> None:
    # finding 21.5: 10 kB of nesting raised RecursionError through LoRA loading
    import struct

    from diffstudio.errors import SafetensorsFormatError

    raw = b'{"__metadata__":{"k":"v"},"a":' + b"[" * 5_000 + b"]" * 5_000 + b"}"
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(SafetensorsFormatError, match="deep.safetensors"):
        apply_lora(dit, path)
