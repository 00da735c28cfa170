"""``--task direct_distill``: train a few-step student against a many-step teacher's images.

The data set's images are what the teacher generated for their captions (e.g. 50 steps with CFG). The student
starts from noise, runs ``--distill_steps`` Euler steps of the pipeline's own schedule for that resolution
(the inference sigmas, shifted like a real run) **with gradients through every step**, and the loss is the
MSE between the latents it ends at and the teacher image's latents. So the student learns to reach the
teacher's result in few steps, rather than to predict velocities at random noise levels.

Noise depends only on ``(seed, epoch, position)`` like the flow-matching objective's, so resumed and
multi-process runs draw the same values. Memory grows with the number of steps (every step's activations are
kept for the backward pass); ``--use_gradient_checkpointing`` (and its offload) applies to each step.
"""

from __future__ import annotations

import copy
from collections import ChainMap
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from diffstudio.errors import PipelineInputError
from diffstudio.pipeline.state import PipelineState
from diffstudio.train.objective import FlowMatchingObjective


class DirectDistillObjective(FlowMatchingObjective):
    """Unrolled few-step sampling from noise, compared with the teacher image's latents.

    Args:
        pipe: The family pipeline.
        trainable: Component slots trained as a whole.
        extra_modules: Further trainable modules (the LoRA side paths).
        steps: Sampling steps the student unrolls (``--distill_steps``).
        caption_dropout: As in :class:`FlowMatchingObjective`.
        activation_offload: As in :class:`FlowMatchingObjective`.
    """

    def __init__(
        self,
        pipe: Any,
        trainable: Sequence[str],
        extra_modules: Mapping[str, nn.Module] | None = None,
        *,
        steps: int = 4,
        caption_dropout: float = 0.0,
        activation_offload: bool = False,
    ) -> None:
        super().__init__(
            pipe, trainable, extra_modules, caption_dropout=caption_dropout, activation_offload=activation_offload
        )
        if steps < 1:
            raise ValueError(f"direct distillation needs at least one step, got {steps}")
        self.steps = int(steps)

    def forward(self, state: PipelineState, generators: Sequence[torch.Generator]) -> Tensor:
        """MSE between the student's ``steps``-step result from fresh noise and the teacher latents.

        Args:
            state: Prepared batch: ``input_latents`` ``(B, L, C)`` (the teacher images) plus conditioning.
            generators: One per sample; each draws its sample's noise.

        Returns:
            The scalar mean loss.
        """
        pipe = self.pipeline
        teacher = state.shared.get("input_latents")
        if teacher is None:
            raise PipelineInputError(
                "direct_distill needs the teacher images: the data set needs an image column and the pipeline a VAE"
            )
        batch, length = teacher.shape[0], teacher.shape[1]
        if len(generators) != batch:
            raise ValueError(f"{len(generators)} generators for a batch of {batch}")
        noise = torch.cat([torch.randn((1, *teacher.shape[1:]), generator=g) for g in generators])
        latents = noise.to(teacher.device, teacher.dtype)
        conditioning = self._conditioning(state, generators, batch)
        scheduler = copy.deepcopy(pipe.scheduler)  # the pipeline's own schedule stays as validation left it
        scheduler.set_timesteps(self.steps, image_seq_len=length)
        for index in range(self.steps):
            timestep = scheduler.timesteps[index].expand(batch).to(teacher.device)
            view = ChainMap({"latents": latents}, conditioning, state.view("positive"))
            with self.saved_activations():
                velocity = pipe.predict_velocity(view, index, timestep)
            latents = scheduler.step(velocity, index, latents)
        loss: Tensor = (latents.float() - teacher.float()).pow(2).flatten(1).mean(dim=1).mean()
        return loss
