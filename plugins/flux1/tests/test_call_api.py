"""FLUX.1 from_pretrained with a diffusers repository first (issue 22.2) and the diffusers call names (22.11)."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from diffstudio import ModelConfig
from diffstudio.errors import ConfigError
from diffstudio.runtime import Runtime
from diffstudio.testing import import_file
from diffstudio_flux1.pipeline import FluxImagePipeline

fp = import_file(Path(__file__).with_name("fixtures_pipeline.py"))
COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae")
SMALL = {"height": 32, "width": 32, "num_inference_steps": 2, "t5_sequence_length": 16, "output_type": "pt"}
INDEX = {
    "_class_name": "FluxPipeline",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, helpers: ModuleType) -> Any:
    built = fp.build_repo(tmp_path_factory.mktemp("flux1-repo"), helpers)
    (built.root / "model_index.json").write_text(json.dumps(INDEX))
    return built


def test_from_pretrained_accepts_a_diffusers_repository_folder(repo: Any) -> None:
    root = repo.root
    by_repo = FluxImagePipeline.from_pretrained(str(root), torch_dtype="float32", device="cpu", runtime=Runtime())
    assert sorted(by_repo.loaded) == ["dit", "text_encoder", "text_encoder_2", "vae"]
    by_configs = FluxImagePipeline.from_pretrained(
        torch_dtype=torch.float32,
        device="cpu",
        model_configs=[
            ModelConfig(path=str(root / n)) for n in ("transformer", "text_encoder", "text_encoder_2", "vae")
        ],
        runtime=Runtime(),
    )
    for pipe in (by_repo, by_configs):
        pipe.set_progress_bar_config(disable=True)
    torch.testing.assert_close(by_repo("a red circle", seed=1, **SMALL), by_configs("a red circle", seed=1, **SMALL))


def test_guidance_scale_is_the_embedded_guidance(repo: Any) -> None:
    pipe = FluxImagePipeline.from_pretrained(repo.root, torch_dtype=torch.float32, device="cpu", runtime=Runtime())
    pipe.set_progress_bar_config(disable=True)
    aliased = pipe("a", seed=2, guidance_scale=5.0, **SMALL)
    torch.testing.assert_close(aliased, pipe("a", seed=2, embedded_guidance=5.0, **SMALL), rtol=0, atol=0)
    assert not torch.equal(aliased, pipe("a", seed=2, embedded_guidance=2.0, **SMALL))


def test_from_pretrained_tokenizer_configs_are_type_checked() -> None:
    with pytest.raises(ConfigError, match="tokenizer_2_config is a str, not a ModelConfig"):
        FluxImagePipeline.from_pretrained(
            tokenizer_2_config="tokenizer_2/", runtime=Runtime(env={}, load_entrypoints=False)
        )
