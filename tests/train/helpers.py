"""Shared by the trainer tests: a trainer's fixed-noise loss and gradients on a fixed batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffstudio.lora import LoraDelta
from diffstudio.runtime import Runtime
from diffstudio.train import TrainConfig, Trainer
from diffstudio.train.loop import load_training_pipeline
from diffstudio.train.objective import sample_generator

EVAL_SEED = 1234


def fixed_loss(trainer: Any, positions: list[int], *, lora_scale: float | None = None) -> float:
    """The trained objective on ``positions`` with noise and sigmas no training step drew (no gradients).

    ``lora_scale`` temporarily scales the trained LoRA side paths (0 gives the untrained model's loss).
    """
    deltas = [m for m in trainer.objective.modules() if isinstance(m, LoraDelta) and m.down.requires_grad]
    saved = [d.scale for d in deltas]
    if lora_scale is not None:
        for delta in deltas:
            delta.scale = lora_scale
    try:
        dataset = trainer._dataset(trainer.pipeline)
        with torch.no_grad():
            batch = trainer._prepare(trainer.pipeline, dataset, None, positions, set())
            generators = [sample_generator(EVAL_SEED, 0, p) for p in positions]
            return float(trainer.objective(batch, generators))
    finally:
        for delta, scale in zip(deltas, saved):
            delta.scale = scale


@dataclass
class Backward:
    """One loss evaluation with gradients: the loss, gradients by parameter name, the trainer, block calls."""

    loss: float
    grads: dict[str, torch.Tensor]
    trainer: Any
    block_calls: int


def loss_and_grads(options: dict[str, Any], positions: list[int]) -> Backward:
    """Set a run up (no training step), compute the loss of ``positions`` and its gradients.

    ``block_calls`` counts the forward calls of the DiT's first double block (2 when it was checkpointed:
    the forward and its recomputation in the backward pass).
    """
    trainer = Trainer(TrainConfig(**options), Runtime())
    trainer.pipeline = pipe = load_training_pipeline(trainer.config, trainer.runtime, "cpu")
    pipe.set_progress_bar_config(disable=True)
    trainable, extra = trainer._trainable(pipe)
    trainer.objective = objective = trainer._objective(pipe, trainable, extra)
    batch = trainer._prepare(pipe, trainer._dataset(pipe), None, positions, set())
    calls: list[int] = []
    handle = pipe.dit.double_blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        loss = objective(batch, [sample_generator(EVAL_SEED, 0, p) for p in positions])
        loss.backward()
    finally:
        handle.remove()
    grads = {n: p.grad.detach().clone() for n, p in objective.named_parameters() if p.grad is not None}
    return Backward(float(loss.detach()), grads, trainer, len(calls))
