"""FLUX.1-Krea-dev has FLUX.1-dev's tensors name for name and shape: it is told apart by its file name, model id or
an explicit ``ModelConfig(config={"model_variant": ...})`` only, and brings its own default (embedded guidance 4.5)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffstudio import ModelConfig
from diffstudio.errors import ConfigError
from diffstudio.identify import identify
from diffstudio.runtime import Runtime
from safetensors.torch import load_file


def _claim(path: Path, **config: object) -> str:
    _, claim = identify(Runtime(), ModelConfig(path=str(path), **config))  # type: ignore[arg-type]
    return str(claim.model_type)


@pytest.fixture(scope="module")
def named(dit_cases, tmp_path_factory) -> dict[str, Path]:
    """One dev-shaped BFL file copied under four names."""
    root = tmp_path_factory.mktemp("krea")
    source = dit_cases["dev"].files["bfl"]
    out = {}
    for key, name in (("dev", "flux1-dev.safetensors"), ("krea", "flux1-krea-dev.safetensors"),
                      ("krea-fp8", "FLUX1-Krea-Dev-fp8.safetensors"), ("renamed", "my-model.safetensors")):  # fmt: skip
        out[key] = root / name
        shutil.copyfile(source, out[key])
    return out


def test_the_same_tensors_are_dev_or_krea_by_name_only(named):
    dev, krea = load_file(named["dev"]), load_file(named["krea"])
    assert dev.keys() == krea.keys() and all(torch.equal(dev[k], krea[k]) for k in dev)
    plain = _claim(named["dev"])  # the tiny model's width makes it "custom"; the official one is "dev"
    assert plain in ("flux1-dit/dev", "flux1-dit/custom")
    assert _claim(named["krea"]) == "flux1-dit/krea-dev"
    assert _claim(named["krea-fp8"]) == "flux1-dit/krea-dev"
    assert _claim(named["renamed"]) == plain


def test_a_renamed_file_is_selected_explicitly(named):
    assert _claim(named["renamed"], config={"model_variant": "krea-dev"}) == "flux1-dit/krea-dev"
    assert _claim(named["krea"], config={"model_variant": "dev"}) == _claim(named["dev"])
    with pytest.raises(ConfigError, match="model_variant.*'schnell'.*'krea-dev'"):
        _claim(named["renamed"], config={"model_variant": "schnell"})


def test_the_repository_folder_names_a_diffusers_transformer(dit_cases, tmp_path):
    """A diffusers ``transformer/`` in the Hugging Face cache of black-forest-labs/FLUX.1-Krea-dev, or in a clone."""
    folder = dit_cases["dev"].files["diffusers"]
    cache = tmp_path / "models--black-forest-labs--FLUX.1-Krea-dev" / "snapshots" / "0123abc" / "transformer"
    clone = tmp_path / "FLUX.1-Krea-dev" / "transformer"
    for target in (cache, clone):
        shutil.copytree(folder, target)
        assert _claim(target) == "flux1-dit/krea-dev"
    assert _claim(folder) != "flux1-dit/krea-dev"


def test_krea_brings_embedded_guidance_4_5(repo, tmp_path):
    from diffstudio_flux1 import FluxImagePipeline

    shutil.copyfile(repo.root / "flux1-dev.safetensors", tmp_path / "flux1-krea-dev.safetensors")
    others = [str(repo.root / n) for n in ("vae", "text_encoder", "text_encoder_2")]

    def guidance(dit: Path, **call: object) -> float:
        configs = [ModelConfig(path=p) for p in (str(dit), *others)]
        pipe = FluxImagePipeline.from_pretrained(
            torch_dtype=torch.float32, device="cpu", runtime=Runtime(), model_configs=configs
        )
        inputs = pipe.call_inputs("a cat", height=32, width=32, num_inference_steps=1, t5_sequence_length=8, **call)
        return float(pipe.prepare(inputs).shared["guidance"][0])

    krea = tmp_path / "flux1-krea-dev.safetensors"
    assert guidance(krea) == 4.5
    assert guidance(krea, embedded_guidance=2.0) == 2.0
    assert guidance(repo.root / "flux1-dev.safetensors") == 3.5
