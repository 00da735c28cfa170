"""Configs win over inference (issue 20.4): the diffusers config.json, or ModelConfig(config=), gives the sizes that
tensor shapes cannot tell (the RoPE axes split); the guess from the head dim is the fallback and says how to pass them.
"""

from __future__ import annotations

import json
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
from diffstudio_flux1.convert import convert_diffusers_to_bfl_dit
from safetensors.torch import save_file
from torch import nn

AXES = [4, 6, 6]  # head dim 16: BFL's rule would need (2, 7, 7), which is odd


def load(config: ModelConfig) -> Any:
    checkpoint, claim = identify(Runtime(), config)
    return claim.load(checkpoint, LoadRequest(config, torch.float32, "cpu"))


@pytest.fixture(scope="module")
def odd_rope(helpers: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, Path]:
    """A diffusers FLUX.1 DiT with head dim 16 and axes_dims_rope [4, 6, 6]: its folder and a BFL single file."""
    from diffusers import FluxTransformer2DModel

    ref = FluxTransformer2DModel(
        patch_size=1,
        in_channels=helpers.IN_CHANNELS,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=helpers.CONTEXT_DIM,
        pooled_projection_dim=helpers.POOLED_DIM,
        guidance_embeds=True,
        axes_dims_rope=AXES,
    )
    helpers.perturb(ref, 5)
    root = tmp_path_factory.mktemp("odd-rope")
    ref.eval().save_pretrained(root / "transformer")
    bfl = root / "flux1-odd.safetensors"
    state = convert_diffusers_to_bfl_dit(helpers.read_folder(root / "transformer"))
    save_file({k: v.contiguous() for k, v in state.items()}, str(bfl))
    return ref, root / "transformer", bfl


def assert_matches(model: Any, ref: nn.Module, helpers: Any) -> None:
    assert model.params.axes_dim == tuple(AXES)
    inp = helpers.dit_inputs()
    expected = helpers.run_reference(ref, inp, True)
    with torch.no_grad():
        got = model(**inp)
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-5, f"max abs diff {diff}"
    assert expected.abs().max() > 0.1


def test_diffusers_folder_axes_dims_rope_is_read(odd_rope, helpers):
    ref, folder, _ = odd_rope
    assert_matches(load(ModelConfig(path=str(folder))), ref, helpers)


def test_single_file_config_override_loads(odd_rope, helpers):
    ref, folder, bfl = odd_rope
    assert_matches(load(ModelConfig(path=str(bfl), config={"axes_dims_rope": AXES})), ref, helpers)
    assert_matches(load(ModelConfig(path=str(bfl), config=str(folder / "config.json"))), ref, helpers)
    assert_matches(load(ModelConfig(path=str(bfl), config=folder)), ref, helpers)


def test_single_file_without_override_names_the_fix(odd_rope):
    _, _, bfl = odd_rope
    with pytest.raises(SizesNotStoredError) as info:
        load(ModelConfig(path=str(bfl)))
    message = str(info.value)
    assert "head dim 16" in message and "'axes_dims_rope'" in message and "ModelConfig(path=..., config=" in message
    assert str(bfl) in message and isinstance(info.value, ConfigError)


def test_config_contradicting_the_weights_names_both(odd_rope):
    _, _, bfl = odd_rope
    with pytest.raises(ParamsShapeError, match=r"gives depth=3 but the weights have 1"):
        load(ModelConfig(path=str(bfl), config={"axes_dims_rope": AXES, "num_layers": 3}))
    with pytest.raises(ConfigError, match="must sum to the head dim 16"):
        load(ModelConfig(path=str(bfl), config={"axes_dims_rope": [4, 4, 4]}))


def test_malformed_config_values_are_config_errors(odd_rope, tmp_path):
    _, _, bfl = odd_rope
    for bad in ({"axes_dims_rope": "4,6,6"}, {"axes_dims_rope": [4, 6.0, 6]}, {"guidance_embeds": "yes"}):
        with pytest.raises(ConfigError, match="fix the config"):
            load(ModelConfig(path=str(bfl), config=bad))
    with pytest.raises(ConfigError, match="patch_size=2 is not supported"):
        load(ModelConfig(path=str(bfl), config={"axes_dims_rope": AXES, "patch_size": 2}))
    broken = tmp_path / "config.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot be read as JSON"):
        load(ModelConfig(path=str(bfl), config=str(broken)))
    broken.write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="not an object"):
        load(ModelConfig(path=str(bfl), config=tmp_path))


def test_model_config_checks_the_config_argument(tmp_path):
    with pytest.raises(ConfigError, match="config=3 is not a configuration"):
        ModelConfig(path="x.safetensors", config=3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="does not exist"):
        ModelConfig(path="x.safetensors", config=str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="does not exist"):
        ModelConfig(path="x.safetensors", config=tmp_path)  # a folder without config.json
    with pytest.raises(ConfigError, match="non-string keys"):
        ModelConfig(path="x.safetensors", config={1: 2})  # type: ignore[dict-item]
    assert ModelConfig(path="x.safetensors", config={"axes_dims_rope": AXES}).config == {"axes_dims_rope": AXES}


def test_another_class_config_beside_a_file_is_ignored(odd_rope, tmp_path):
    """A config.json of another diffusers class (a repository root's, a VAE's) does not describe this DiT."""
    import shutil

    _, folder, bfl = odd_rope
    shutil.copy(bfl, tmp_path / bfl.name)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "axes_dims_rope": [4, 4, 8]}))
    with pytest.raises(SizesNotStoredError):
        load(ModelConfig(path=str(tmp_path / bfl.name)))
    shutil.copy(folder / "config.json", tmp_path / "config.json")  # the DiT's own config beside a BFL file counts
    assert load(ModelConfig(path=str(tmp_path / bfl.name))).params.axes_dim == tuple(AXES)


def test_vae_config_override_sets_latent_factors(vae_case):
    bfl = vae_case.files["bfl"]
    vae = load(ModelConfig(path=str(bfl), config={"scaling_factor": 0.5, "shift_factor": 0.25}))
    assert (vae.params.scale_factor, vae.params.shift_factor) == (0.5, 0.25)


def test_text_encoder_config_override_for_bare_weights(tmp_path):
    """ModelConfig(config=) reaches the CLIP and T5 loaders: weights without their config.json load with it."""
    import shutil

    from diffstudio.testing import import_file
    from diffstudio_flux1.text_encoders import TextEncoderError

    fx = import_file(Path(__file__).with_name("fixtures_text.py"))
    reference = fx.build_clip_encoder(tmp_path / "clip", vocab=64)
    t5_reference = fx.build_t5_encoder(tmp_path / "t5", vocab=64, shards=1)
    for name, ref in (("clip", reference), ("t5", t5_reference)):
        bare = tmp_path / f"bare-{name}"
        bare.mkdir()
        for file in (tmp_path / name).glob("*.safetensors"):
            shutil.copy(file, bare / file.name)
        with pytest.raises(TextEncoderError, match="config.json"):
            load(ModelConfig(path=str(bare)))
        fields = json.loads((tmp_path / name / "config.json").read_text())
        model = load(ModelConfig(path=str(bare), config=fields))
        ids = torch.tensor([[0, 5, 7, 1]])
        with torch.no_grad():
            assert torch.equal(model(ids).last_hidden_state, ref(ids).last_hidden_state)
