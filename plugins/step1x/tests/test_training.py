"""Step1X-Edit training: the DiT and its connector, full and LoRA, with the Qwen2.5-VL embeddings cached.

Both runs use split training: ``sft:data_process`` stores the VAE latents (target and reference) and the
Qwen2.5-VL states once, ``sft:train`` trains from them (the LLM never runs while training). Sigma is pinned
(logit-normal with a tiny spread) so that 8 steps on two memorised samples lower the loss reliably; the batch of two
checks that the connector runs over a collated batch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from diffstudio.train import train
from safetensors.torch import load_file

EPOCHS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, step1x_repo: dict[str, Any], fp: Any) -> dict[str, Any]:
    """Two (edited, reference, instruction) rows and the split-training cache made from them."""
    from step1x_kit import CONFIG

    root = step1x_repo["root"]
    data = tmp_path_factory.mktemp("step1x-data")
    rows = []
    for i in range(2):
        fp.image(32, 32, seed=70 + i).save(data / f"{i}.png")
        fp.image(32, 32, seed=90 + i).save(data / f"ref-{i}.png")
        rows.append({"prompt": "add a crown", "image": f"{i}.png", "step1x_reference_image": f"ref-{i}.png"})
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    models = [{"path": str(root / "step1x-edit-i1258.safetensors"), "config": CONFIG}, str(root / "ae.safetensors"),
              str(root / "qwen")]  # fmt: skip
    setup = {"data": data, "models": models, "file": root / "step1x-edit-i1258.safetensors"}
    cache = tmp_path_factory.mktemp("step1x-cache")
    train(**options(setup, cache, task="sft:data_process", trainable_models=["dit"]))
    setup["cache"] = cache / "cache"
    return setup


def options(setup: dict[str, Any], output: Path, **extra: Any) -> dict[str, Any]:
    data = setup["data"]
    values: dict[str, Any] = {
        "dataset_base_path": str(data), "dataset_metadata_path": str(data / "metadata.jsonl"),
        "data_file_keys": ["image", "step1x_reference_image"], "model_paths": setup["models"], "height": 32,
        "width": 32, "batch_size": 2, "output_path": str(output), "seed": 0, "timestep_sampling": "logit_normal",
        "logit_std": 1e-4, "num_epochs": EPOCHS,
    }  # fmt: skip
    values.update(extra)
    return values


def split_train(setup: dict[str, Any], output: Path, **extra: Any) -> Any:
    shutil.copytree(setup["cache"], output / "cache")
    return train(**options(setup, output, task="sft:train", **extra))


def falls(losses: list[float]) -> tuple[float, float]:
    return sum(losses[:2]) / 2, sum(losses[-2:]) / 2


def test_the_cache_holds_the_llm_and_vae_units_not_the_trained_dit(setup: dict[str, Any]) -> None:
    units = json.loads((setup["cache"] / "units.json").read_text())["units"]
    assert {"step1x_encode_prompt", "step1x_reference"} <= set(units)
    stored = load_file(str(sorted(setup["cache"].glob("*.safetensors"))[0]))
    assert stored["positive/prompt_emb"].shape[1:] == (640, 32) and stored["positive/step1x_mask"].sum() > 0


def test_split_training_equals_one_stage_training(setup: dict[str, Any], tmp_path: Path) -> None:
    """The cached Qwen2.5-VL states and latents are what one-stage training computes (the LLM frozen there)."""
    extra = {"trainable_models": ["dit"], "learning_rate": 1e-3, "num_epochs": 2}
    one_stage = train(**options(setup, tmp_path / "one-stage", **extra))
    cached = split_train(setup, tmp_path / "split", **extra)
    assert len(cached.losses) == 2 and cached.losses == pytest.approx(one_stage.losses, rel=1e-4, abs=1e-6)


def test_full_training_of_the_dit_and_connector_lowers_the_loss(setup: dict[str, Any], tmp_path: Path) -> None:
    result = split_train(setup, tmp_path, trainable_models=["dit"], learning_rate=1e-3)
    first, last = falls(result.losses)
    print(f"step1x full training loss {first:.4f} -> {last:.4f} over {len(result.losses)} steps")
    assert len(result.losses) == EPOCHS and last < 0.8 * first, result.losses
    saved, base = load_file(str(tmp_path / f"epoch-{EPOCHS - 1}.safetensors")), load_file(str(setup["file"]))
    assert set(saved) == set(base)  # the published file's names: the DiT and connector.*
    for prefix in ("connector.", "double_blocks."):  # both were trained (the connector slot did not freeze it)
        assert any(not torch.equal(saved[k], base[k]) for k in base if k.startswith(prefix)), prefix


def test_lora_training_reaches_the_connector_and_loads_back(
    setup: dict[str, Any], step1x_repo: dict[str, Any], tmp_path: Path
) -> None:
    from step1x_kit import load_pipeline

    result = split_train(setup, tmp_path, lora_base_model="dit", lora_rank=4, learning_rate=1e-2, lora_format="comfy")
    first, last = falls(result.losses)
    print(f"step1x LoRA training loss {first:.4f} -> {last:.4f} over {len(result.losses)} steps")
    assert last < 0.8 * first, result.losses
    lora = load_file(str(tmp_path / f"epoch-{EPOCHS - 1}.safetensors"))
    connector = [k for k in lora if k.startswith("diffusion_model.connector.") and k.endswith("lora_up.weight")]
    assert connector and any(lora[k].abs().sum() > 0 for k in connector)
    pipe = load_pipeline(step1x_repo)
    gen = torch.Generator().manual_seed(1)
    llm, mask, t = torch.randn(1, 9, 32, generator=gen), torch.ones(1, 9, dtype=torch.long), torch.tensor([0.5])
    with torch.no_grad():
        before = pipe.dit.text_stream(llm, t, mask)[0]
        report = pipe.load_lora(str(tmp_path / f"epoch-{EPOCHS - 1}.safetensors"))
        after = pipe.dit.text_stream(llm, t, mask)[0]
        assert report.modules["connector"] == len(connector) and not report.unmatched_keys
        assert not torch.allclose(before, after)
        pipe.unload_lora()
        torch.testing.assert_close(pipe.dit.text_stream(llm, t, mask)[0], before, atol=0, rtol=0)
        fused = pipe.load_lora(str(tmp_path / f"epoch-{EPOCHS - 1}.safetensors"), fuse=True)  # merged into weights
        assert fused.fused and fused.modules == report.modules
        torch.testing.assert_close(pipe.dit.text_stream(llm, t, mask)[0], after, atol=1e-5, rtol=0)
        pipe.unload_lora()
        torch.testing.assert_close(pipe.dit.text_stream(llm, t, mask)[0], before, atol=0, rtol=0)
