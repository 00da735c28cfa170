"""`diffstudio train --trainable_models lora_encoder --extra_inputs lora_encoder_inputs` lowers the loss, DiT frozen."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from diffstudio.loading import Checkpoint
from diffstudio.runtime import Runtime
from diffstudio.testing import import_file
from diffstudio.train import TrainConfig, Trainer
from diffstudio_lora_encoder.loaders import claim_lora_encoder
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.slow  # a training run, like the other trainer tests (ControlNet, tests/train)

encoder_tests = import_file(Path(__file__).with_name("test_lora_encoder.py"))


def fixed_loss(trainer: Any, positions: list[int]) -> float:
    """The trained objective on ``positions`` with noise and sigmas no training step drew (no gradients)."""
    from diffstudio.train.objective import sample_generator

    dataset = trainer._dataset(trainer.pipeline)
    with torch.no_grad():
        batch = trainer._prepare(trainer.pipeline, dataset, None, positions, set())
        return float(trainer.objective(batch, [sample_generator(1234, 0, p) for p in positions]))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, fp: Any) -> tuple[Path, Path]:
    """Four 32x32 images, each row naming one of two LoRA files; and the untrained encoder file."""
    root = tmp_path_factory.mktemp("lora-encoder-data")
    runtime = Runtime()
    loras = [encoder_tests.write(runtime, encoder_tests.canonical(10 + i), "kohya", root / f"lora-{i}.safetensors")
             for i in range(2)]  # fmt: skip
    rows = []
    for i in range(4):
        fp.image(32, 32, seed=70 + i).save(root / f"{i}.png")
        rows.append({"prompt": "", "image": f"{i}.png", "lora_encoder_inputs": str(loras[i % 2])})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    encoder = root / "encoder.safetensors"
    oracle = encoder_tests.oracle_model(seed=3)
    save_file({k: v.contiguous() for k, v in oracle.state_dict().items()}, str(encoder))
    return root, encoder


def test_training_the_lora_encoder_lowers_the_loss(repo: Any, data: tuple[Path, Path], tmp_path: Path) -> None:
    root, encoder = data
    options: dict[str, Any] = {
        "dataset_base_path": str(root), "dataset_metadata_path": str(root / "metadata.jsonl"),
        "model_paths": [str(repo.root / n) for n in ("transformer", "text_encoder", "text_encoder_2", "vae")]
        + [str(encoder)],
        "height": 32, "width": 32, "extra_inputs": ["lora_encoder_inputs"], "trainable_models": ["lora_encoder"],
        "batch_size": 1, "learning_rate": 5e-2, "num_epochs": 3, "output_path": str(tmp_path),
        "remove_prefix_in_ckpt": "pipe.lora_encoder.", "pipeline_args": {"t5_sequence_length": 16}, "seed": 0,
    }  # fmt: skip
    trainer = Trainer(TrainConfig(**options), Runtime())
    result = trainer.run()
    assert len(result.losses) == 12 and all(torch.isfinite(torch.tensor(result.losses)))
    after = fixed_loss(trainer, [0, 1, 2, 3])
    dit = trainer.pipeline.dit
    assert not any(p.requires_grad for p in dit.parameters())  # the DiT stays frozen
    trainer.pipeline.lora_encoder.load_state_dict(load_file(str(encoder)))
    before = fixed_loss(trainer, [0, 1, 2, 3])
    print(f"lora encoder training: fixed-noise loss {before:.4f} -> {after:.4f}")
    assert after < 0.995 * before  # one token per LoRA moves the loss a little (2.753 -> 2.725), deterministically
    saved = tmp_path / "epoch-2.safetensors"
    assert set(load_file(str(saved))) == set(load_file(str(encoder)))
    assert claim_lora_encoder(Checkpoint.open(saved)) is not None  # loads back as a LoRA encoder
