"""The training objective: per-sample preparation through the pipeline's units, and the flow-matching loss.

A sample is prepared by running the pipeline's ``prepare``-stage units on ``pipe.call_inputs(...)`` with the
training image as ``input_image`` and ``denoising_strength=1``, so every family's own units encode the prompt
and the image; the clean latents come back as ``input_latents`` ``(1, L, C)``. Samples are prepared one at a
time and collated (tensors whose first axis is 1 are concatenated along it), so one-stage and split training
see identical batches.

The loss is the flow-matching velocity MSE: ``x_t = (1 - sigma) x_0 + sigma * noise``, target
``noise - x_0``, sigmas drawn from the pipeline scheduler's training grid (``--timestep_sampling``) and
weighted by its ``training_weight`` (``--loss_weighting``, DiffSynth's bump by default). Noise and sigma of a
sample depend only on ``(seed, epoch, position)``, so resumed and multi-process runs draw the same values.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import ChainMap
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from diffstudio.dit.extensions import TextStream
from diffstudio.errors import PipelineInputError
from diffstudio.pipeline.state import PipelineState


def sample_generator(seed: int, epoch: int, position: int) -> torch.Generator:
    """A CPU generator that depends only on ``(seed, epoch, position)``."""
    digest = hashlib.sha256(f"diffstudio-noise/{seed}/{epoch}/{position}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def training_inputs(pipe: Any, sample: Mapping[str, Any], pipeline_args: Mapping[str, Any]) -> dict[str, Any]:
    """The state inputs of one training sample (one prompt, its image as ``input_image``)."""
    sample = dict(sample)
    prompt = sample.pop("prompt")
    image = sample.pop("image", None)
    arguments: dict[str, Any] = {"seed": 0, "num_inference_steps": 1, "denoising_strength": 1.0}
    arguments.update(pipeline_args)
    arguments.update(sample)
    if image is not None:
        arguments["input_image"] = image
    inputs: dict[str, Any] = pipe.call_inputs(prompt, **arguments)
    return inputs


def collate(states: Sequence[PipelineState]) -> PipelineState:
    """Join per-sample states into one batch state.

    Tensors with a leading axis of 1 are concatenated along it (so are the fields of ``text_stream``
    replacements); other values must be equal across samples (the first is kept), else lists of them are kept.
    """
    if len(states) == 1:
        return states[0]
    out = PipelineState(shared={})
    for branch in ("shared", "positive", "negative"):
        target = out.branch(branch)
        keys: list[str] = []
        for state in states:
            for key in state.branch(branch):
                if key not in keys:
                    keys.append(key)
        for key in keys:
            values = [state.branch(branch).get(key) for state in states]
            target[key] = _join(values)
    return out


def _join(values: list[Any]) -> Any:
    first = values[0]
    if isinstance(first, TextStream) and all(isinstance(v, TextStream) for v in values):
        parts = {f.name: _join([getattr(v, f.name) for v in values]) for f in dataclasses.fields(first)}
        return TextStream(**parts)  # per-sample text-stream replacements (Nexus-Gen) join field by field
    if isinstance(first, Tensor) and first.ndim >= 1 and first.shape[0] == 1:
        if all(isinstance(v, Tensor) and v.shape == first.shape for v in values):
            return torch.cat(values, dim=0)
    if isinstance(first, list) and all(isinstance(v, list) and len(v) == 1 for v in values):
        return [v[0] for v in values]
    if all(_equal(first, v) for v in values[1:]):
        return first
    return values


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    try:
        return bool(a == b)
    except (RuntimeError, ValueError):
        return a is b


class FlowMatchingObjective(nn.Module):
    """Holds what is trained (for the optimizer, DDP and checkpoints) and computes the loss of a batch.

    Args:
        pipe: The family pipeline (its components stay in their slots; ``trainable`` ones are registered here
            too so that DDP and checkpoints see them).
        trainable: Component slots trained as a whole.
        extra_modules: Further trainable modules by name (e.g. ``"lora"``: the LoRA side paths).
        timestep_sampling: See ``FlowMatchScheduler.sample_training_sigmas``.
        sampling_options: Its ``logit_mean``, ``logit_std`` and ``mode_scale`` (diffusers' names and defaults).
        loss_weighting: See ``FlowMatchScheduler.training_weight``.
        caption_dropout: Probability that a sample is trained unconditioned: its positive conditioning is
            replaced by the negative branch's (the empty prompt), so real CFG works at sampling time.
        activation_offload: Keep the tensors autograd saves for the backward pass (with gradient
            checkpointing: the block inputs) in CPU memory (``--use_gradient_checkpointing_offload``).
    """

    def __init__(
        self,
        pipe: Any,
        trainable: Sequence[str],
        extra_modules: Mapping[str, nn.Module] | None = None,
        *,
        timestep_sampling: str = "uniform",
        sampling_options: Mapping[str, float] | None = None,
        loss_weighting: str = "bump",
        caption_dropout: float = 0.0,
        activation_offload: bool = False,
    ) -> None:
        super().__init__()
        self.caption_dropout = caption_dropout
        self.activation_offload = activation_offload
        self.pipe = [pipe]  # a list: the pipeline is not a module and must not be registered as one
        self.trained = nn.ModuleDict({slot: pipe.loaded[slot].module for slot in trainable})
        self.extra = nn.ModuleDict(dict(extra_modules or {}))
        self.timestep_sampling = timestep_sampling
        self.sampling_options = dict(sampling_options or {})
        self.loss_weighting = loss_weighting

    @property
    def pipeline(self) -> Any:
        """The pipeline being trained."""
        return self.pipe[0]

    def forward(self, state: PipelineState, generators: Sequence[torch.Generator]) -> Tensor:
        """Flow-matching loss of a collated batch state (one generator per sample).

        Args:
            state: Prepared batch: ``input_latents`` ``(B, L, C)`` plus the family's conditioning.
            generators: One per sample; each draws its sample's sigma and noise.

        Returns:
            The scalar weighted mean loss.
        """
        pipe = self.pipeline
        clean = state.shared.get("input_latents")
        if clean is None:
            raise PipelineInputError(
                "the prepared sample has no input_latents: the data set needs an image column (--data_file_keys) "
                "and the pipeline a VAE"
            )
        batch, length = clean.shape[0], clean.shape[1]
        if len(generators) != batch:
            raise ValueError(f"{len(generators)} generators for a batch of {batch}")
        scheduler = pipe.scheduler
        sigmas = torch.cat(
            [
                scheduler.sample_training_sigmas(
                    1,
                    generator=g,
                    image_seq_len=length,
                    timestep_sampling=self.timestep_sampling,
                    **self.sampling_options,
                )
                for g in generators
            ]
        )
        noise = torch.cat([torch.randn((1, *clean.shape[1:]), generator=g) for g in generators])
        noise = noise.to(clean.device, clean.dtype)
        sigma = sigmas.to(clean.device, clean.dtype).view(batch, *([1] * (clean.ndim - 1)))
        noisy = (1 - sigma) * clean + sigma * noise
        target = noise - clean
        conditioning = self._conditioning(state, generators, batch)
        view = ChainMap({"latents": noisy}, conditioning, state.view("positive"))
        with self.saved_activations():
            velocity = pipe.predict_velocity(view, 0, (sigmas * 1000).to(clean.device))
        per_sample = (velocity.float() - target.float()).pow(2).flatten(1).mean(dim=1)
        weights = scheduler.training_weight(sigmas, weighting=self.loss_weighting, image_seq_len=length)
        loss: Tensor = (per_sample * weights.to(per_sample.device)).mean()
        return loss

    def saved_activations(self) -> AbstractContextManager[Any]:
        """Where autograd keeps saved tensors during the denoiser call: CPU memory with activation offload."""
        if not self.activation_offload:
            return nullcontext()
        return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())

    def _conditioning(self, state: PipelineState, generators: Sequence[torch.Generator], batch: int) -> dict[str, Any]:
        """Negative-branch values for the samples that caption dropout unconditions (drawn last per sample)."""
        if self.caption_dropout <= 0:
            return {}
        drop = torch.cat([torch.rand((1,), generator=g) for g in generators]) < self.caption_dropout
        if not bool(drop.any()) or not state.negative:
            return {}
        mixed: dict[str, Any] = {}
        for key, negative in state.negative.items():
            positive = state.positive.get(key)
            if isinstance(negative, Tensor) and isinstance(positive, Tensor) and positive.shape == negative.shape:
                if positive.shape[0] == batch:
                    mask = drop.to(positive.device).view(batch, *([1] * (positive.ndim - 1)))
                    mixed[key] = torch.where(mask, negative, positive)
        return mixed
