"""Memory options of the trainer: float8 storage, offloading, gradient checkpointing (and its offload)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch
from diffstudio.testing import import_file
from diffstudio.train import TrainConfig, TrainConfigError, Trainer, train
from diffstudio.train.models import stored_dtypes

pytestmark = pytest.mark.slow
LORA = {"trainable_models": [], "lora_base_model": "dit", "lora_target_modules": ["qkv", "proj", "linear1"],
        "lora_rank": 4}  # fmt: skip
EVERY_LINEAR = {**LORA, "lora_target_modules": [], "learning_rate": 1e-2}  # learns fastest on the tiny DiT


def _helpers() -> ModuleType:
    return import_file(Path(__file__).with_name("helpers.py"))


def _linear_weight_dtypes(trainer: Trainer, slot: str) -> set[torch.dtype]:
    strategy = trainer.pipeline.loaded[slot].strategy
    return {t.offload.dtype for u in strategy.units for t in u.tensors if not t.high_precision and t.name.endswith(
        ".weight") and len(t.shape) == 2}  # fmt: skip


def test_fp8_lora_base_stores_float8_and_the_lora_learns(tiny_model, tmp_path):
    options = tiny_model.options(tmp_path, **EVERY_LINEAR, fp8_models=["dit", "text_encoder"], num_epochs=6)
    trainer = Trainer(TrainConfig(**options))
    trainer.run()
    for slot in ("dit", "text_encoder"):
        assert _linear_weight_dtypes(trainer, slot) == {torch.float8_e4m3fn}, slot
        strategy = trainer.pipeline.loaded[slot].strategy
        strategy.onload()  # staged copies stay float8 too: layers cast inside their own forward
        staged = {t.resident.dtype for u in strategy.units for t in u.tensors if not t.high_precision}
        assert staged <= {torch.float8_e4m3fn, torch.int64}, staged
    assert {d for d in stored_dtypes(trainer.pipeline, "vae") if d.is_floating_point} == {torch.float32}
    h = _helpers()
    before = h.fixed_loss(trainer, list(range(8)), lora_scale=0.0)
    after = h.fixed_loss(trainer, list(range(8)))
    assert after < before * 0.9, (before, after)
    assert (tmp_path / "epoch-5.safetensors").is_file()


def test_fp8_and_offloaded_frozen_models_under_a_full_finetune(tiny_model, tmp_path):
    """fp8 named by the seed's path form, offload through a ModelConfig object in --model_paths."""
    dit, vae, text = tiny_model.model_paths_list()
    options = tiny_model.options(
        tmp_path, model_paths=[dit, {"path": vae, "offload_device": "cpu"}, text], fp8_models=[text],
        num_epochs=3, learning_rate=3e-3,
    )  # fmt: skip
    h = _helpers()
    before = h.fixed_loss(h.loss_and_grads(options, [0]).trainer, list(range(8)))
    trainer = Trainer(TrainConfig(**options))
    trainer.run()
    assert _linear_weight_dtypes(trainer, "text_encoder") == {torch.float8_e4m3fn}
    assert trainer.pipeline.loaded["vae"].strategy.report().offload.startswith("cpu/")
    assert {d for d in stored_dtypes(trainer.pipeline, "dit") if d.is_floating_point} == {torch.float32}
    after = h.fixed_loss(trainer, list(range(8)))
    assert after < before * 0.9, (before, after)


def test_fp8_or_offload_of_a_trained_model_is_refused(tiny_model, tmp_path):
    with pytest.raises(TrainConfigError, match=r"'dit' is trained .*--lora_base_model dit"):
        train(**tiny_model.options(tmp_path, fp8_models=["dit"]))
    with pytest.raises(TrainConfigError, match=r"--offload_models names \['unet'\]"):
        train(**tiny_model.options(tmp_path, offload_models=["unet"]))


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_and_its_offload_give_the_same_gradients(tiny_model, tmp_path, lora):
    h = _helpers()
    extra = LORA if lora else {}
    plain = h.loss_and_grads(tiny_model.options(tmp_path, **extra), [0, 1])
    assert plain.block_calls == 1 and plain.grads
    for options in ({"use_gradient_checkpointing": True}, {"use_gradient_checkpointing_offload": True}):
        run = h.loss_and_grads(tiny_model.options(tmp_path, **extra, **options), [0, 1])
        assert run.block_calls == 2, options  # forward + recomputation: the block really was checkpointed
        offloaded = isinstance(run.trainer.objective.saved_activations(), torch.autograd.graph.save_on_cpu)
        assert offloaded == ("use_gradient_checkpointing_offload" in options)
        assert run.loss == pytest.approx(plain.loss, abs=1e-6)
        assert run.grads.keys() == plain.grads.keys()
        for name, grad in run.grads.items():
            torch.testing.assert_close(grad, plain.grads[name], atol=1e-6, rtol=1e-5, msg=name)
