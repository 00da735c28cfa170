"""LoRA files that must not change a FLUX.1 DiT (finding 21.6 of issue 21).

Before: a NaN alpha, an alpha of shape (2,) (its first value was used), or NaN matrices changed the model without a
word (a NaN image, exit 0). FLUX.2 LoRAs share BFL layer names with FLUX.1; they are refused (typed) when their
metadata says so, when they name FLUX.2-only layers, or when they name blocks beyond the model's depth.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffstudio.lora import LoraAlphaError, LoraArchitectureError, LoraBaseModelError, LoraNonFiniteError
from diffstudio_flux1.lora import apply_lora, list_loras
from diffstudio_flux1.model import Flux
from diffstudio_flux1.params import FluxParams
from safetensors.torch import save_file
from torch import Tensor

PARAMS = FluxParams(
    hidden_size=64, num_heads=2, depth=2, depth_single_blocks=1, vec_in_dim=8, context_in_dim=16, mlp_ratio=2.0,
    axes_dim=(4, 14, 14),
)  # fmt: skip


@pytest.fixture
def dit() -> Flux:
    torch.manual_seed(0)
    return Flux(PARAMS)


def kohya_lora(blocks: range, alpha: Tensor | None = None, rank: int = 2) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    for i in blocks:
        name = f"lora_unet_double_blocks_{i}_img_attn_qkv"
        state[f"{name}.lora_down.weight"] = torch.randn(rank, 64)
        state[f"{name}.lora_up.weight"] = torch.randn(192, rank)
        if alpha is not None:
            state[f"{name}.alpha"] = alpha.clone()
    return state


def save(tmp_path: Path, state: dict[str, Tensor], metadata: dict[str, str] | None = None) -> Path:
    path = tmp_path / "lora.safetensors"
    save_file(state, str(path), metadata=metadata)
    return path


def test_matching_lora_applies(dit: Flux, tmp_path: Path) -> None:
    assert apply_lora(dit, save(tmp_path, kohya_lora(range(2), torch.tensor(1.0)))).modules_matched == 2


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_lora_alpha_nan_or_inf_is_refused(dit: Flux, tmp_path: Path, value: float) -> None:
    with pytest.raises(LoraAlphaError, match="lora_unet_double_blocks_0_img_attn_qkv.alpha"):
        apply_lora(dit, save(tmp_path, kohya_lora(range(1), torch.tensor(value))))
    assert not list_loras(dit)


def test_lora_alpha_of_shape_2_is_refused(dit: Flux, tmp_path: Path) -> None:
    with pytest.raises(LoraAlphaError, match=r"shape \[2\]"):
        apply_lora(dit, save(tmp_path, kohya_lora(range(1), torch.tensor([1.0, 2.0]))))


def test_nonfinite_lora_matrices_are_refused(dit: Flux, tmp_path: Path) -> None:
    state = kohya_lora(range(2))
    state["lora_unet_double_blocks_1_img_attn_qkv.lora_down.weight"][0, 5] = float("nan")
    with pytest.raises(LoraNonFiniteError, match="double_blocks.1.img_attn.qkv"):
        apply_lora(dit, save(tmp_path, state))


def test_lora_with_more_blocks_than_the_model_is_refused(dit: Flux, tmp_path: Path) -> None:
    with pytest.raises(LoraArchitectureError, match="double_blocks up to index 4, the model has 2"):
        apply_lora(dit, save(tmp_path, kohya_lora(range(5))))


def test_flux2_lora_is_refused(dit: Flux, tmp_path: Path) -> None:
    with pytest.raises(LoraBaseModelError, match="flux2"):
        apply_lora(dit, save(tmp_path, kohya_lora(range(2)), {"modelspec.architecture": "flux-2-klein-4b/lora"}))
    state = kohya_lora(range(2))
    state["lora_unet_double_stream_modulation_img_lin.lora_down.weight"] = torch.randn(2, 64)
    state["lora_unet_double_stream_modulation_img_lin.lora_up.weight"] = torch.randn(384, 2)
    with pytest.raises(LoraArchitectureError, match="FLUX.2 layers"):
        apply_lora(dit, save(tmp_path, state))
    assert not list_loras(dit)


def test_deeply_nested_lora_header_is_a_typed_error(dit: Flux, tmp_path: Path) -> None:
    # finding 21.5: 10 kB of nesting raised RecursionError through LoRA loading
    import struct

    from diffstudio.errors import SafetensorsFormatError

    raw = b'{"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0],"x":' + b"[" * 5_000 + b"]" * 5_000 + b"}}"
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(SafetensorsFormatError, match="deep.safetensors"):
        apply_lora(dit, path)
