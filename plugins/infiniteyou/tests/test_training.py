"""The trainer trains the InfuseNet and the projector with the DiT frozen (``--trainable_models
infuse_net,image_proj``), and a DiT LoRA with InfiniteYou frozen; the identity comes from a metadata column."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from diffstudio.train import train
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, fp: Any) -> Path:
    """Four 32x32 images, each with a cached identity embedding (a JSON list) in a JSON-lines metadata file."""
    root = tmp_path_factory.mktemp("infiniteyou-data")
    rows = []
    for i in range(4):
        fp.image(32, 32, seed=40 + i).save(root / f"{i}.png")
        embedding = torch.randn(512, generator=torch.Generator().manual_seed(i))
        rows.append({"prompt": "a face", "image": f"{i}.png",
                     "infinityou_id_embedding": (embedding / embedding.norm()).tolist()})  # fmt: skip
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _options(repo: Any, files: Any, data: Path, output: Path, **extra: Any) -> dict[str, Any]:
    root = repo.root
    models = [root / n for n in ("transformer", "text_encoder", "text_encoder_2", "vae")]
    options: dict[str, Any] = {
        "dataset_base_path": str(data), "dataset_metadata_path": str(data / "metadata.jsonl"),
        "model_paths": [str(p) for p in (*models, files.infusenet_folder, files.projector_file)],
        "height": 32, "width": 32, "extra_inputs": ["infinityou_id_embedding"], "batch_size": 2,
        "output_path": str(output), "pipeline_args": {"t5_sequence_length": 16}, "seed": 0,
    }  # fmt: skip
    options.update(extra)
    return options


def test_training_the_infusenet_and_projector_lowers_the_loss(repo: Any, files: Any, dataset: Path,
                                                              tmp_path: Path) -> None:  # fmt: skip
    result = train(**_options(repo, files, dataset, tmp_path, trainable_models=["infuse_net", "image_proj"],
                              learning_rate=2e-3, num_epochs=6))  # fmt: skip
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    print(f"infiniteyou training loss {first:.4f} -> {last:.4f} over {len(result.losses)} steps")
    assert last < 0.8 * first, result.losses
    saved = load_file(str(tmp_path / "epoch-5.safetensors"))  # two components: DiffSynth's "pipe.<slot>." names
    assert "pipe.image_proj.latents" in saved and "pipe.infuse_net.controlnet_blocks.0.weight" in saved
    assert not any(k.startswith(("pipe.dit.", "double_blocks.")) for k in saved)  # the DiT stayed frozen


def test_a_dit_lora_trains_with_infiniteyou_frozen(repo: Any, files: Any, dataset: Path, tmp_path: Path) -> None:
    result = train(**_options(repo, files, dataset, tmp_path, lora_base_model="dit", lora_rank=4, learning_rate=5e-3,
                              num_epochs=1))  # fmt: skip
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    lora = load_file(str(tmp_path / "epoch-0.safetensors"))
    assert lora and all("controlnet" not in k and "latents" not in k for k in lora)
