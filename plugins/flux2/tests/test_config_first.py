"""Configs win over inference (issue 20.4): the diffusers config.json, or ModelConfig(config=), gives the sizes that
tensor shapes cannot tell (the RoPE axes split and theta); the four-way split of the head dim is the fallback and
says how to pass them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffstudio import ModelConfig
from diffstudio.errors import ConfigError
from diffstudio.identify import identify
from diffstudio.loading.shapes import ParamsShapeError, SizesNotStoredError
from diffstudio.runtime import Runtime
from diffstudio.types import LoadRequest
from diffstudio_flux2.convert import convert_diffusers_to_bfl_dit
from safetensors.torch import save_file
from torch import nn

AXES = [2, 2, 4, 4]  # head dim 12: four equal even parts do not exist
THETA = 500


def load(config: ModelConfig) -> Any:
    checkpoint, claim = identify(Runtime(), config)
    return claim.load(checkpoint, LoadRequest(config, torch.float32, "cpu"))


@pytest.fixture(scope="module")
def odd_rope(helpers: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, Path]:
    """A diffusers FLUX.2 DiT with head dim 12, axes_dims_rope [2, 2, 4, 4], rope_theta 500: folder and BFL file."""
    from diffusers import Flux2Transformer2DModel

    ref = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=helpers.IN_CHANNELS,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=12,
        num_attention_heads=2,
        joint_attention_dim=helpers.CONTEXT_DIM,
        mlp_ratio=3.0,
        axes_dims_rope=AXES,
        rope_theta=THETA,
        guidance_embeds=True,
    )
    helpers.perturb(ref, 5)
    root = tmp_path_factory.mktemp("odd-rope")
    ref.eval().save_pretrained(root / "transformer")
    bfl = root / "flux2-odd.safetensors"
    state = convert_diffusers_to_bfl_dit(helpers.read_folder(root / "transformer"))
    save_file({k: v.contiguous() for k, v in state.items()}, str(bfl))
    return ref, root / "transformer", bfl


def assert_matches(model: Any, ref: nn.Module, helpers: Any) -> None:
    assert (model.params.axes_dim, model.params.theta) == (tuple(AXES), THETA)
    inp = helpers.dit_inputs()
    expected = helpers.run_reference(ref, inp, True)
    with torch.no_grad():
        got = model(**inp)
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-5, f"max abs diff {diff}"
    assert expected.abs().max() > 0.1


def test_diffusers_folder_axes_dims_rope_and_theta_are_read(odd_rope, helpers):
    ref, folder, _ = odd_rope
    assert_matches(load(ModelConfig(path=str(folder))), ref, helpers)


def test_single_file_config_override_loads(odd_rope, helpers):
    ref, folder, bfl = odd_rope
    override = {"axes_dims_rope": AXES, "rope_theta": THETA}
    assert_matches(load(ModelConfig(path=str(bfl), config=override)), ref, helpers)
    assert_matches(load(ModelConfig(path=str(bfl), config=str(folder / "config.json"))), ref, helpers)


def test_single_file_without_override_names_the_fix(odd_rope):
    _, _, bfl = odd_rope
    with pytest.raises(SizesNotStoredError) as info:
        load(ModelConfig(path=str(bfl)))
    message = str(info.value)
    assert "head dim 12" in message and "'axes_dims_rope'" in message and "ModelConfig(path=..., config=" in message


def test_config_contradicting_the_weights_names_both(odd_rope):
    _, _, bfl = odd_rope
    with pytest.raises(ParamsShapeError, match=r"gives use_guidance_embed=False but the weights have True"):
        load(ModelConfig(path=str(bfl), config={"axes_dims_rope": AXES, "guidance_embeds": False}))
    with pytest.raises(ConfigError, match="eps=1e-05 is not supported"):
        load(ModelConfig(path=str(bfl), config={"axes_dims_rope": AXES, "eps": 1e-5}))
    with pytest.raises(ParamsShapeError, match="out_channels=8"):
        load(ModelConfig(path=str(bfl), config={"axes_dims_rope": AXES, "out_channels": 8}))


def test_text_encoder_config_override_for_bare_weights(tmp_path):
    """ModelConfig(config=) reaches the text encoder too: weights without their config.json load with it."""
    import shutil

    from diffstudio.testing import import_file
    from diffstudio_flux2.text_encoders import TextEncoderError

    fx = import_file(Path(__file__).with_name("fixtures_text.py"))
    vocab = fx.build_qwen3_tokenizer(tmp_path / "tokenizer")
    fx.build_qwen3_encoder(tmp_path / "text_encoder", vocab, seed=0, shards=1)
    bare = tmp_path / "bare"
    bare.mkdir()
    for file in (tmp_path / "text_encoder").glob("*.safetensors"):
        shutil.copy(file, bare / file.name)
    with pytest.raises(TextEncoderError, match="config.json"):
        load(ModelConfig(path=str(bare)))
    config = tmp_path / "text_encoder" / "config.json"
    model = load(ModelConfig(path=str(bare), config=str(config)))
    assert model is not None and len(model.layers) >= 1
