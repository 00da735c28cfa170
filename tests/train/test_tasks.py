"""Trainer tasks and options: direct distillation, LoRA continuation and differential LoRA, output keys,
data-loading workers and validation images."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
from diffstudio.testing import import_file
from diffstudio.train import TrainConfig, Trainer, train
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
LORA = {"trainable_models": [], "lora_base_model": "dit", "lora_target_modules": ["qkv", "proj", "linear1"],
        "lora_rank": 4}  # fmt: skip
EVERY_LINEAR = {**LORA, "lora_target_modules": [], "learning_rate": 1e-2}  # learns fastest on the tiny DiT


def _helpers() -> ModuleType:
    return import_file(Path(__file__).with_name("helpers.py"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_direct_distill_lowers_the_unrolled_loss(tiny_model, tmp_path):
    options = tiny_model.options(tmp_path, **EVERY_LINEAR, task="direct_distill", distill_steps=2, num_epochs=3,
                                 use_gradient_checkpointing=True)  # fmt: skip
    trainer = Trainer(TrainConfig(**options))
    result = trainer.run()
    assert result.steps == 12
    h = _helpers()
    before = h.fixed_loss(trainer, list(range(8)), lora_scale=0.0)
    after = h.fixed_loss(trainer, list(range(8)))
    assert after < before * 0.9, (before, after)
    # the objective really unrolls: 2 DiT calls per loss, and the result is not the flow-matching loss
    run = h.loss_and_grads(tiny_model.options(tmp_path, task="direct_distill", distill_steps=2), [0, 1])
    single = h.loss_and_grads(tiny_model.options(tmp_path), [0, 1])
    assert run.block_calls == 2 and single.block_calls == 1
    assert run.loss != pytest.approx(single.loss)


def test_lora_checkpoint_continues_and_preset_lora_trains_the_difference(tiny_model, tmp_path):
    h = _helpers()
    first = tiny_model.options(tmp_path / "first", **LORA, num_epochs=2, learning_rate=3e-3)
    train(**first)
    saved = tmp_path / "first" / "epoch-1.safetensors"
    trained = load_file(str(saved))
    assert max(v.abs().max().item() for k, v in trained.items() if "lora_B" in k) > 0
    # --lora_checkpoint: the new run starts from the file (a negligible step keeps it there)
    tiny = {"max_steps": 1, "learning_rate": 1e-12, "weight_decay": 0.0, "num_epochs": 1}
    cont = Trainer(TrainConfig(**tiny_model.options(tmp_path / "cont", **LORA, **tiny, lora_checkpoint=str(saved))))
    cont.run()
    assert _max_diff(load_file(str(tmp_path / "cont" / "step-1.safetensors")), trained) < 1e-6
    # --preset_lora_path: the base includes the preset, the new LoRA starts at zero (the difference)
    preset = Trainer(TrainConfig(**tiny_model.options(tmp_path / "preset", **LORA, **tiny, preset_lora_path=str(saved),
                                                      preset_lora_model="dit")))  # fmt: skip
    preset.run()
    difference = load_file(str(tmp_path / "preset" / "step-1.safetensors"))
    assert max(v.abs().max().item() for k, v in difference.items() if "lora_B" in k) < 1e-9
    with_preset, with_checkpoint = h.fixed_loss(preset, [0, 1]), h.fixed_loss(cont, [0, 1])
    assert with_preset == pytest.approx(with_checkpoint, abs=1e-5)
    assert with_preset != pytest.approx(h.fixed_loss(cont, [0, 1], lora_scale=0.0), abs=1e-4)


def test_output_keys_prefix_removal_and_opensource_alignment(tiny_model, tmp_path):
    one = {"max_steps": 1, "num_epochs": 1}
    train(**tiny_model.options(tmp_path / "full", **one, remove_prefix_in_ckpt="pipe.dit."))
    assert load_file(str(tmp_path / "full" / "step-1.safetensors")).keys() == load_file(str(tiny_model.dit)).keys()
    train(**tiny_model.options(tmp_path / "kept", **one, remove_prefix_in_ckpt="pipe."))
    keys = load_file(str(tmp_path / "kept" / "step-1.safetensors")).keys()
    assert keys and all(k.startswith("dit.") for k in keys)
    train(**tiny_model.options(tmp_path / "aligned", **LORA, **one, align_to_opensource_format=True))
    path = tmp_path / "aligned" / "step-1.safetensors"
    keys = load_file(str(path)).keys()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith(".alpha") for k in keys)
    train(**tiny_model.options(tmp_path / "bare", **LORA, **one, remove_prefix_in_ckpt="transformer."))
    keys = load_file(str(tmp_path / "bare" / "step-1.safetensors")).keys()
    assert keys and not any(k.startswith("transformer.") for k in keys)


def test_dataset_workers_give_the_same_run(tiny_model, tmp_path):
    plain = train(**tiny_model.options(tmp_path / "plain", num_epochs=1, caption_dropout=0.3))
    workers = train(**tiny_model.options(tmp_path / "workers", num_epochs=1, caption_dropout=0.3,
                                         dataset_num_workers=2))  # fmt: skip
    assert workers.losses == plain.losses
    a = load_file(str(tmp_path / "plain" / "epoch-0.safetensors"))
    b = load_file(str(tmp_path / "workers" / "epoch-0.safetensors"))
    assert _max_diff(a, b) == 0.0


def test_validation_prompt_renders_pngs_with_their_parameters(tiny_model, tmp_path):
    train(**tiny_model.options(tmp_path, **LORA, num_epochs=1, validation_prompt="a red circle",
                               validation_steps=2))  # fmt: skip
    images = sorted((tmp_path / "validation").glob("*.png"))
    assert [p.name for p in images] == ["step-2.png", "step-4.png"]
    with Image.open(images[0]) as image:
        assert image.size == (64, 64)
        text = json.dumps(dict(image.info))
    assert "a red circle" in text
    with safe_open(str(tmp_path / "epoch-0.safetensors"), "pt") as handle:
        assert json.loads(handle.metadata()["diffstudio.lora"])["rank"] == 4
