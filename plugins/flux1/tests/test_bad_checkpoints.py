"""Damaged FLUX.1 checkpoints give typed errors that name the file and the tensor (finding 21.5 of issue 21).

Before: a scalar or 1-D weight raised IndexError / ValueError from the size probing in ``params.py``, integer or
bool weights a torch RuntimeError from ``load_state_dict``, and StrictLoadError did not name the file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffstudio import ModelConfig
from diffstudio.errors import CheckpointError, ConfigError, StrictLoadError
from diffstudio.identify import identify
from diffstudio.loading import WeightDtypeError
from diffstudio.runtime import Runtime
from diffstudio.types import LoadRequest
from diffstudio_flux1.model import Flux
from diffstudio_flux1.params import AutoEncoderParams, FluxParams, ParamsShapeError, default_axes_dim
from safetensors.torch import save_file
from torch import Tensor

PARAMS = FluxParams(
    hidden_size=64, num_heads=2, depth=1, depth_single_blocks=1, vec_in_dim=8, context_in_dim=16, mlp_ratio=2.0,
    axes_dim=(4, 14, 14),
)  # fmt: skip


@pytest.fixture(scope="module")
def state() -> dict[str, Tensor]:
    torch.manual_seed(0)
    return {k: torch.randn(v.shape) for k, v in Flux(PARAMS).state_dict().items()}


def load(tmp_path: Path, state: dict[str, Tensor], **changes: Tensor | None) -> object:
    edited = dict(state)
    for key, value in changes.items():
        name = key.replace("__", ".")
        if value is None:
            del edited[name]
        else:
            edited[name] = value
    path = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in edited.items()}, str(path))
    config = ModelConfig(path=str(path))
    checkpoint, claim = identify(Runtime(), config)
    return claim.load(checkpoint, LoadRequest(config, torch.float32, "cpu"))


def test_tiny_dit_loads(tmp_path: Path, state: dict[str, Tensor]) -> None:
    assert isinstance(load(tmp_path, state), Flux)


@pytest.mark.parametrize(
    "key",
    [
        "final_layer.linear.weight",
        "txt_in.weight",
        "double_blocks.0.img_attn.norm.query_norm.scale",
        "double_blocks.0.img_mlp.0.weight",
        "img_in.weight",
        "vector_in.in_layer.weight",
    ],
)
@pytest.mark.parametrize("bad", [torch.tensor(1.0), torch.randn(7)], ids=["scalar", "1-D"])
def test_scalar_or_1d_weight_is_a_typed_error_naming_file_and_tensor(
    tmp_path: Path, state: dict[str, Tensor], key: str, bad: Tensor
) -> None:
    with pytest.raises(CheckpointError) as info:
        load(tmp_path, state, **{key.replace(".", "__"): bad})
    message = str(info.value)
    assert str(tmp_path / "dit.safetensors") in message
    if key in ("img_in.weight", "vector_in.in_layer.weight"):  # no longer looks like a FLUX.1 DiT at all
        assert "No installed family recognises" in message
    elif bad.ndim == 0 or key != "double_blocks.0.img_attn.norm.query_norm.scale":
        assert key in message


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
def test_integer_or_bool_weights_are_a_typed_error(
    tmp_path: Path, state: dict[str, Tensor], dtype: torch.dtype
) -> None:
    key = "double_blocks.0.img_attn.qkv.weight"
    with pytest.raises(WeightDtypeError) as info:
        load(tmp_path, state, **{key.replace(".", "__"): state[key].to(dtype)})
    assert key in str(info.value) and str(tmp_path / "dit.safetensors") in str(info.value)


def test_strict_load_error_names_the_file(tmp_path: Path, state: dict[str, Tensor]) -> None:
    with pytest.raises(StrictLoadError) as info:
        load(tmp_path, state, double_blocks__0__img_attn__proj__weight=None)
    assert f"from {tmp_path / 'dit.safetensors'}" in str(info.value)
    assert info.value.source == str(tmp_path / "dit.safetensors")


def test_params_errors_are_project_errors() -> None:
    with pytest.raises(ConfigError):
        FluxParams(hidden_size=10, num_heads=3)
    with pytest.raises(ConfigError, match="unknown FLUX.1 preset"):
        FluxParams.preset("nope")
    with pytest.raises(ConfigError, match="RoPE"):
        default_axes_dim(16)
    with pytest.raises(ParamsShapeError, match="'img_in.weight' is missing") as info:
        FluxParams.from_state_dict_shapes({}, source="x.safetensors")
    assert isinstance(info.value, CheckpointError) and isinstance(info.value, ValueError)
    assert "x.safetensors" in str(info.value)
    with pytest.raises(ParamsShapeError, match="expected 4 dimension"):
        AutoEncoderParams.from_state_dict_shapes({"encoder.conv_in.weight": (8,)})
    shapes = {"img_in.weight": (64, 64), "final_layer.linear.weight": (64, 64), "vector_in.in_layer.weight": (64, 8),
              "txt_in.weight": (64, 16), "double_blocks.0.x": (1,), "double_blocks.2.x": (1,)}  # fmt: skip
    with pytest.raises(ParamsShapeError, match="not contiguous"):
        FluxParams.from_state_dict_shapes(shapes)
