"""The trainer trains a ControlNet (``--trainable_models controlnet``) and a DiT LoRA beside a frozen ControlNet."""

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
    """Four 32x32 images, each with a control image, in a JSON-lines metadata file."""
    root = tmp_path_factory.mktemp("controlnet-data")
    rows = []
    for i in range(4):
        fp.image(32, 32, seed=40 + i).save(root / f"{i}.png")
        fp.image(32, 32, seed=60 + i).save(root / f"control-{i}.png")
        control = [{"image": str(root / f"control-{i}.png"), "processor_id": "canny"}]
        rows.append({"prompt": "a red circle", "image": f"{i}.png", "controlnet_inputs": control})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _options(repo: Any, folder: Path, data: Path, output: Path, **extra: Any) -> dict[str, Any]:
    root = repo.root
    options: dict[str, Any] = {
        "dataset_base_path": str(data), "dataset_metadata_path": str(data / "metadata.jsonl"),
        "model_paths": [str(root / n) for n in ("transformer", "text_encoder", "text_encoder_2", "vae", folder)],
        "height": 32, "width": 32, "extra_inputs": ["controlnet_inputs"], "batch_size": 2, "output_path": str(output),
        "pipeline_args": {"t5_sequence_length": 16}, "seed": 0,
    }  # fmt: skip
    options.update(extra)
    return options


def test_training_a_controlnet_lowers_the_loss(repo: Any, controlnet_files: Any, dataset: Path, tmp_path: Path) -> None:
    folder = controlnet_files["union"][1]
    result = train(**_options(repo, folder, dataset, tmp_path, trainable_models=["controlnet"], learning_rate=2e-3,
                              num_epochs=6, use_gradient_checkpointing=True))  # fmt: skip
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    print(f"controlnet training loss {first:.4f} -> {last:.4f} over {len(result.losses)} steps")
    assert last < 0.8 * first, result.losses
    saved = load_file(str(tmp_path / "epoch-5.safetensors"))
    assert "controlnet_mode_embedder.weight" in saved and "double_blocks.0.img_attn.qkv.weight" in saved
    from diffstudio.loading import Checkpoint
    from diffstudio_controlnet.loaders import claim_controlnet

    claim = claim_controlnet(Checkpoint.open(tmp_path / "epoch-5.safetensors"))
    assert claim is not None and claim.model_type == "flux1-controlnet/union"


def test_a_dit_lora_trains_with_the_controlnet_frozen(
    repo: Any, controlnet_files: Any, dataset: Path, tmp_path: Path
) -> None:
    folder = controlnet_files["union"][1]
    result = train(**_options(repo, folder, dataset, tmp_path, lora_base_model="dit", lora_rank=4, learning_rate=5e-3,
                              lora_format="kohya", num_epochs=3))  # fmt: skip
    assert len(result.losses) == 6 and all(torch.isfinite(torch.tensor(result.losses)))
    lora = load_file(str(tmp_path / "epoch-2.safetensors"))
    assert lora and all("controlnet" not in k for k in lora)  # only the DiT's side paths were trained and saved
    assert not (tmp_path / "epoch-2-controlnet.safetensors").exists()
