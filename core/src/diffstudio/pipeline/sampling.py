"""The sampling loop of a pipeline: prepare units, the denoising loop (CFG, Euler steps, callbacks), finish units.

:meth:`SamplingLoop.generate` is what a family's ``__call__`` runs; CONTRIBUTING ("Reading the denoise loop")
shows the same thing as one straight function. :class:`~diffstudio.pipeline.base.BasePipeline` inherits this.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from diffstudio.errors import PipelineInputError
from diffstudio.pipeline.runner import UnitRunner
from diffstudio.pipeline.state import PipelineState
from diffstudio.pipeline.validate import OUTPUT_TYPES, check_callback_updates, check_values, ensure_finite

if TYPE_CHECKING:
    from diffstudio.pipeline.limits import Limits

__all__ = ["RunInfo", "SamplingLoop", "is_main_process"]


@dataclass
class RunInfo:
    """What the last call used: per-image seeds and the effective arguments (for metadata)."""

    seeds: list[int] = field(default_factory=list)
    arguments: dict[str, Any] = field(default_factory=dict)
    step_cache: dict[str, Any] | None = None  # what a step cache did (diffstudio.cache.units.step_cache_report)


def is_main_process() -> bool:
    """True unless this process is a non-zero rank of a distributed launch (``RANK`` / ``LOCAL_RANK``)."""
    return os.environ.get("RANK", "0") in ("", "0") and os.environ.get("LOCAL_RANK", "0") in ("", "0")


class SamplingLoop(UnitRunner):
    """Runs a call: ``prepare`` units, the denoising loop, ``finish`` units (mixed into ``BasePipeline``)."""

    if TYPE_CHECKING:  # what the loop uses of the component container (BasePipeline)
        denoise_components: ClassVar[tuple[str, ...]]
        size_multiple: ClassVar[int]
        scheduler: Any
        limits: Limits
        progress_bar_config: dict[str, Any]
        last_run: RunInfo

    def check_size(self, height: int, width: int) -> None:
        """Raise ``PipelineInputError`` unless both sides are positive multiples of ``size_multiple``."""
        m = type(self).size_multiple
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % m:
                lower = max(m, (int(value) // m) * m) if isinstance(value, int) else m
                raise PipelineInputError(
                    f"{name}={value!r} is not a positive multiple of {m}; use e.g. {lower} or {lower + m}"
                )

    @staticmethod
    def seeds_for(seed: int | None, batch: int) -> list[int]:
        """Per-image seeds: ``seed + i``; a random base seed (recorded) when ``seed`` is None."""
        base = random.SystemRandom().randrange(0, 2**31) if seed is None else int(seed)
        return [base + i for i in range(batch)]

    def generate_noise(
        self,
        shape: Sequence[int],
        seeds: Sequence[int],
        rand_device: str = "cpu",
        rand_dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Draw one noise tensor per seed and stack them.

        Args:
            shape: Shape of one image's noise (no batch axis).
            seeds: One seed per image.
            rand_device: Where the generator runs; ``"cpu"`` gives the same noise on every device.
            rand_dtype: Dtype the noise is drawn in.

        Returns:
            ``(len(seeds), *shape)`` on the pipeline device, in the pipeline dtype.
        """
        draws = []
        for s in seeds:
            generator = torch.Generator(rand_device).manual_seed(int(s))
            draws.append(torch.randn(tuple(shape), generator=generator, device=rand_device, dtype=rand_dtype))
        return torch.stack(draws).to(device=self.device, dtype=self.torch_dtype)

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """Configure the progress bar like diffusers (``disable=True``, ``desc=...``, any tqdm argument)."""
        self.progress_bar_config.update(kwargs)

    def progress(self, iterable: Sequence[Any], progress_bar_cmd: Callable[..., Any] | None) -> Iterable[Any]:
        """Wrap the denoising loop in a progress bar (tqdm by default; main process only)."""
        if progress_bar_cmd is None:
            from tqdm.auto import tqdm

            progress_bar_cmd = tqdm
        config = dict(self.progress_bar_config)
        config.setdefault("disable", not is_main_process())
        if progress_bar_cmd.__module__.startswith("tqdm"):
            result: Iterable[Any] = progress_bar_cmd(iterable, **config)
            return result
        return progress_bar_cmd(iterable)  # type: ignore[no-any-return]

    def call_inputs(self, prompt: Any, **kwargs: Any) -> dict[str, Any]:
        """Turn call arguments into the state inputs that :meth:`generate` runs (the trainer's entry too).

        Families implement it with the seed's argument names and defaults; their ``__call__`` is
        ``self.generate(self.call_inputs(prompt, **kwargs))``. The trainer calls it with one prompt, the
        training image as ``input_image`` and ``denoising_strength=1`` to get a complete set of inputs.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement call_inputs()")

    def predict_velocity(self, inputs: Mapping[str, Any], step_index: int, timestep: torch.Tensor) -> torch.Tensor:
        """Run the denoiser for one branch (the family's ``model_fn``).

        Args:
            inputs: The branch's view of the state (branch outputs over shared values).
            step_index: Index of the denoising step.
            timestep: The scheduler's timestep for this step.

        Returns:
            The predicted velocity, same shape as ``inputs["latents"]``.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement predict_velocity()")

    def guidance(self, positive: torch.Tensor, negative: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance: ``negative + cfg_scale * (positive - negative)``."""
        return negative + cfg_scale * (positive - negative)

    def denoise(
        self,
        state: PipelineState,
        *,
        cfg: bool,
        progress_bar_cmd: Callable[..., Any] | None = None,
        callback_on_step_end: Callable[..., Any] | None = None,
    ) -> None:
        """The denoising loop: step units, model calls per branch, CFG, Euler step, callbacks."""
        timesteps = state.shared["timesteps"]
        step_units = [u for u in self.units if u.stage == "step"]
        cfg_scale = float(state.shared.get("cfg_scale") or 1.0)
        self.activate(self.denoise_components)
        for index in self.progress(range(len(timesteps)), progress_bar_cmd):
            timestep = timesteps[index]
            for unit in step_units:
                self.run_unit(unit, state, cfg, step_index=index, timestep=timestep)
            velocity = self.predict_velocity(state.view("positive"), index, timestep)
            if cfg:
                negative = self.predict_velocity(state.view("negative"), index, timestep)
                velocity = self.guidance(velocity, negative, cfg_scale)
            velocity = self.blend_inpaint(state, velocity, index)
            state.shared["latents"] = self.scheduler.step(velocity, index, state.shared["latents"])
            if index == 0 or index == len(timesteps) - 1:
                ensure_finite(state.shared["latents"], f"in the latents after denoising step {index + 1}")
            if callback_on_step_end is not None:
                updates = callback_on_step_end(self, index, timestep, {"latents": state.shared["latents"]})
                if updates:
                    state.shared.update(check_callback_updates(updates, state.shared["latents"]))
        self.activate(())

    def blend_inpaint(self, state: PipelineState, velocity: torch.Tensor, index: int) -> torch.Tensor:
        """Keep the unmasked region on the input image's trajectory (when ``inpaint_mask`` is set).

        ``inpaint_mask`` is ``(B, L, 1)`` in token layout, 1 where the image is repainted.
        """
        mask = state.shared.get("inpaint_mask")
        original = state.shared.get("input_latents")
        if mask is None or original is None:
            return velocity
        sigma = self.scheduler.sigmas[index]
        towards_input = (state.shared["latents"] - original) / sigma
        blended: torch.Tensor = mask * velocity + (1 - mask) * towards_input
        return blended

    def prepare(
        self,
        inputs: Mapping[str, Any],
        *,
        cfg: bool = False,
        skip: Iterable[str] = (),
        state: PipelineState | None = None,
    ) -> PipelineState:
        """Run the ``prepare``-stage units on ``inputs`` and return the state (the trainer's entry too).

        Runs under the caller's grad mode (``generate`` wraps it in ``no_grad``). With ``input_image`` and
        ``denoising_strength=1`` a family's input-image unit writes the clean latents as ``input_latents``
        ``(B, L, C)``; the conditioning is in ``state.view("positive")``.

        Args:
            inputs: Call arguments.
            cfg: Also run per-branch units on the negative branch.
            skip: Names of units not to run (e.g. those whose outputs a split-training cache already holds).
            state: Continue from this state instead of a new one (its shared values are updated by ``inputs``).
        """
        if state is None:
            state = PipelineState(shared=dict(inputs))
        else:
            state.shared.update(inputs)
        skipped = set(skip)
        for unit in self.units:
            if unit.stage == "prepare" and unit.name not in skipped:
                self.run_unit(unit, state, cfg)
        return state

    def generate(
        self,
        inputs: dict[str, Any],
        *,
        progress_bar_cmd: Callable[..., Any] | None = None,
        callback_on_step_end: Callable[..., Any] | None = None,
    ) -> Any:
        """Run every unit and the denoising loop on ``inputs``; return ``state.shared["output"]``.

        Families call this from their ``__call__`` after validating arguments.
        """
        output_type = inputs.get("output_type", "pil")
        if output_type not in OUTPUT_TYPES:
            raise PipelineInputError(f"output_type={output_type!r}; expected one of {OUTPUT_TYPES}")
        check_values(inputs, self.limits)
        cfg_scale = inputs.get("cfg_scale")
        cfg = cfg_scale is not None and float(cfg_scale) != 1.0
        with torch.no_grad():
            state = self.prepare(inputs, cfg=cfg)
            self.denoise(state, cfg=cfg, progress_bar_cmd=progress_bar_cmd, callback_on_step_end=callback_on_step_end)
            for unit in self.units:
                if unit.stage == "finish":
                    self.run_unit(unit, state, cfg)
            self.activate(())
        from diffstudio.cache.units import step_cache_report

        self.last_run = RunInfo(seeds=list(state.shared.get("seeds") or []), arguments=dict(inputs),
                                step_cache=step_cache_report(state))  # fmt: skip
        return state.shared.get("output")
