"""The trainer is family-agnostic: a LoRA on a tiny FLUX.1 model (the flux1 plugin's test repository) learns,
and its file loads back through the FLUX.1 LoRA loader with the same DiT output as the trained side paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffstudio import ModelConfig
from diffstudio.runtime import Runtime
from diffstudio.testing import import_file
from diffstudio.train import TrainConfig, Trainer

pytestmark = pytest.mark.slow
FLUX1_TESTS = Path(__file__).parents[2] / "plugins" / "flux1" / "tests"


@pytest.fixture(scope="module")
def flux1_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    helpers = import_file(FLUX1_TESTS / "conftest.py")
    fixtures = import_file(FLUX1_TESTS / "fixtures_pipeline.py")
    root = tmp_path_factory.mktemp("flux1-train")
    fixtures.build_repo(root, helpers)
    return root


def _options(repo: Path, data: Path, output: Path, **overrides: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "dataset_base_path": str(data),
        "dataset_metadata_path": str(data / "metadata.csv"),
        "model_paths": [str(repo / "flux1-dev.safetensors"), str(repo / "ae.safetensors"),
                        str(repo / "text_encoder"), str(repo / "text_encoder_2")],
        "height": 32, "width": 32, "batch_size": 2, "num_epochs": 3, "learning_rate": 1e-2,
        "trainable_models": [], "lora_base_model": "dit", "lora_rank": 4, "lora_format": "diffusers",
        "output_path": str(output), "pipeline_args": {"t5_sequence_length": 16, "embedded_guidance": 1.0},
    }  # fmt: skip
    options.update(overrides)
    return options


def test_flux1_lora_trains_and_loads_back_through_the_flux1_loader(flux1_repo, tiny_model, tmp_path):
    from diffstudio_flux1.pipeline import FluxImagePipeline

    helpers = import_file(Path(__file__).with_name("helpers.py"))
    options = _options(flux1_repo, tiny_model.data, tmp_path, fp8_models=["text_encoder_2"])
    trainer = Trainer(TrainConfig(**options), Runtime())
    result = trainer.run()
    assert result.steps == 12
    before = helpers.fixed_loss(trainer, list(range(8)), lora_scale=0.0)
    after = helpers.fixed_loss(trainer, list(range(8)))
    assert after < before * 0.9, (before, after)
    trained = trainer.pipeline
    assert trained.loaded["text_encoder_2"].strategy.report().offload.endswith("float8_e4m3fn")
    fresh = FluxImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", runtime=Runtime(),
        model_configs=[ModelConfig(path=p) for p in options["model_paths"]],
    )  # fmt: skip
    report = fresh.load_lora(str(tmp_path / "epoch-2.safetensors"))
    assert report.format == "flux1/diffusers" and not report.unmatched_keys
    call = trained.call_inputs("a red circle", height=32, width=32, seed=1, num_inference_steps=2,
                               t5_sequence_length=16, embedded_guidance=1.0)  # fmt: skip
    trained.dit.eval()
    with torch.no_grad():
        state = trained.prepare(call)
        inputs = state.view("positive")
        timestep = torch.tensor(500.0)
        ours = trained.predict_velocity(inputs, 0, timestep)
        loaded = fresh.predict_velocity(inputs, 0, timestep)
        fresh.unload_lora()
        plain = fresh.predict_velocity(inputs, 0, timestep)
    assert (ours - plain).abs().max() > 1e-3  # the trained LoRA changes the output
    torch.testing.assert_close(loaded, ours, atol=1e-5, rtol=1e-5)
