"""FLUX.1-Krea-dev trains through the dev path: a full fine-tune and a LoRA of a Krea-named DiT (the tiny FLUX.1
test model under Krea's file name) load as ``flux1-dit/krea-dev`` and lower a fixed-noise loss."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from diffstudio.runtime import Runtime
from diffstudio.testing import import_file
from diffstudio.train import TrainConfig, Trainer

pytestmark = pytest.mark.slow
POSITIONS = list(range(4))


@pytest.fixture(scope="module")
def krea(repo: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The kit's dev-shaped BFL DiT copied as ``flux1-krea-dev.safetensors``."""
    path = tmp_path_factory.mktemp("krea") / "flux1-krea-dev.safetensors"
    shutil.copyfile(repo.root / "flux1-dev.safetensors", path)
    return path


def _options(repo: Any, krea: Path, data: Path, output: Path, **overrides: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "dataset_base_path": str(data), "dataset_metadata_path": str(data / "metadata.csv"),
        "model_paths": [str(krea), *(str(repo.root / n) for n in ("vae", "text_encoder", "text_encoder_2"))],
        "height": 32, "width": 32, "batch_size": 2, "num_epochs": 1, "output_path": str(output),
        "pipeline_args": {"t5_sequence_length": 16}, "seed": 0,
    }  # fmt: skip
    options.update(overrides)
    return options


def test_a_krea_lora_trains_through_the_dev_path(repo, krea, tiny_model, tmp_path):
    helpers = import_file(Path(__file__).with_name("helpers.py"))
    options = _options(repo, krea, tiny_model.data, tmp_path, lora_base_model="dit", lora_rank=4, learning_rate=1e-2,
                       dataset_repeat=1)  # fmt: skip
    trainer = Trainer(TrainConfig(**options), Runtime())
    trainer.run()
    assert trainer.pipeline.loaded["dit"].claim.model_type == "flux1-dit/krea-dev"
    before = helpers.fixed_loss(trainer, POSITIONS, lora_scale=0.0)
    after = helpers.fixed_loss(trainer, POSITIONS)
    assert after < 0.9 * before, (before, after)


def test_a_full_krea_fine_tune_trains_through_the_dev_path(repo, krea, tiny_model, tmp_path):
    helpers = import_file(Path(__file__).with_name("helpers.py"))
    options = _options(repo, krea, tiny_model.data, tmp_path, trainable_models=["dit"], learning_rate=1e-3)
    before = helpers.loss_and_grads(options, POSITIONS).loss
    trainer = Trainer(TrainConfig(**options), Runtime())
    trainer.run()
    assert trainer.pipeline.loaded["dit"].claim.model_type == "flux1-dit/krea-dev"
    after = helpers.fixed_loss(trainer, POSITIONS)
    assert after < 0.9 * before, (before, after)
