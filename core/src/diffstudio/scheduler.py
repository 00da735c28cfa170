"""Flow-matching (rectified-flow) scheduler for FLUX.1 and FLUX.2: inference schedules and Euler steps.

The model predicts a velocity ``v = noise - x0``; the noisy sample at noise level ``sigma`` is
``x_sigma = (1 - sigma) * x0 + sigma * noise`` (sigma 1 is pure noise, 0 the clean sample), and one Euler step
moves from ``sigma_i`` to ``sigma_{i+1}`` along ``v``.

Schedules (``shift_mode``):

* ``"flux1"``: diffusers' FLUX.1 schedule. The grid ``linspace(1, 1/N, N)`` is shifted exponentially with
  ``mu = flux1_mu(image_seq_len)``, the line through (256 tokens, 0.5) and (4096 tokens, 1.15).
* ``"flux2"``: diffusers' FLUX.2 schedule (all FLUX.2 pipelines, dev and klein). Same grid, shifted with
  BFL's empirical ``mu = flux2_empirical_mu(image_seq_len, N)``.
* ``"static"``: the resolution-independent shift ``s * sigma / (1 + (s - 1) * sigma)`` with ``s = shift``.
  ``FlowMatchScheduler("static", shift=3.0, sigma_min=0.003 / 1.002)`` is DiffSynth's FLUX.1 schedule.
* ``"none"``: the unshifted grid.

``set_timesteps`` reproduces the sigmas and timesteps of diffusers' ``FluxPipeline`` / ``Flux2Pipeline``
(``FlowMatchEulerDiscreteScheduler`` with ``use_dynamic_shifting=True``) bit for bit, and ``step`` reproduces
``FlowMatchEulerDiscreteScheduler.step``. Decisions where the references differ:

* **Explicit sigmas** (``sigmas=``) are the N unshifted step-start sigmas. Like diffusers' pipelines, they
  are still shifted (with the family's ``mu``, or the static shift), so passing the same ``sigmas`` to
  diffusers and to diffstudio gives the same schedule. ``shift_sigmas=False`` uses them as given. The final
  0.0 is always appended and must not be part of ``sigmas``.
* **Image-to-image** (``denoising_strength < 1``) follows DiffSynth, not diffusers' step truncation: the
  unshifted grid becomes ``linspace(sigma_start, sigma_min, N)`` with
  ``sigma_start = sigma_min + (1 - sigma_min) * strength`` (``sigma_min = 1/N`` unless configured), then it
  is shifted as usual. The schedule keeps all N steps, starting at ``shift(sigma_start)``. Diffusers' img2img
  pipelines instead keep the last ``int(N * strength)`` steps of the text-to-image schedule. Inherited quirk:
  with ``sigma_min = 1/N`` and N = 1 the only sigma is 1, so one-step image-to-image ignores the strength.
* **An explicit ``mu``** always means the exponential shift with that ``mu``, whatever ``shift_mode`` is.

Training sigmas (the training grid, sigma sampling and the loss weighting) live in :mod:`diffstudio.train.sigmas`;
this class inherits them (:class:`~diffstudio.train.sigmas.TrainingSigmas`).

The object holds only its configuration and the current schedule; there is no global state and no
randomness except through an explicit ``torch.Generator``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor

from diffstudio.errors import ConfigError, PipelineInputError
from diffstudio.schedules import (
    FLUX2_TRAINING_MU,
    flux1_mu,
    flux2_empirical_mu,
    img2img_start_sigma,
    linspace_float64,
    static_shift,
    time_shift_exponential,
)
from diffstudio.schedules import positive_int as _positive_int
from diffstudio.train.sigmas import LossWeighting, TimestepSampling, TrainingSigmas

__all__ = [
    "FLUX2_TRAINING_MU",
    "FlowMatchScheduler",
    "LossWeighting",
    "ShiftMode",
    "TimestepSampling",
    "flux1_mu",
    "flux2_empirical_mu",
    "static_shift",
    "time_shift_exponential",
]

ShiftMode = Literal["flux1", "flux2", "static", "none"]

class FlowMatchScheduler(TrainingSigmas):
    """Flow-matching Euler scheduler serving FLUX.1, FLUX.2 and training.

    Args:
        shift_mode: How the sigma grid is shifted: ``"flux1"`` / ``"flux2"`` (resolution-dependent exponential
            shift, diffusers' pipelines), ``"static"`` (``shift``), ``"none"``. See the module docstring.
        shift: Factor of the static shift (``"static"`` mode, and FLUX.1 training without ``image_seq_len``).
        base_shift: FLUX.1 ``mu`` at ``base_image_seq_len`` tokens.
        max_shift: FLUX.1 ``mu`` at ``max_image_seq_len`` tokens.
        base_image_seq_len: First point of the FLUX.1 ``mu`` line.
        max_image_seq_len: Second point of the FLUX.1 ``mu`` line.
        num_train_timesteps: ``T``: timesteps are ``sigma * T``, and the training grid has ``T`` points.
        sigma_min: Last sigma of the unshifted grid; None means ``1/N`` for N steps (diffusers, DiffSynth
            FLUX.2). DiffSynth's FLUX.1 schedule uses ``0.003 / 1.002``.

    Attributes:
        sigmas: Float32 tensor ``(N + 1,)``, decreasing, last value 0.0 (empty before ``set_timesteps``).
        timesteps: Float32 tensor ``(N,)``, ``sigmas[:-1] * num_train_timesteps``.
        num_inference_steps: N (0 before ``set_timesteps``).
        mu: The exponential-shift ``mu`` of the current schedule, None when it uses no exponential shift.

    Raises:
        ConfigError: An option is out of range.
    """

    def __init__(
        self,
        shift_mode: ShiftMode = "flux2",
        shift: float = 3.0,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        num_train_timesteps: int = 1000,
        *,
        sigma_min: float | None = None,
    ) -> None:
        if shift_mode not in get_args(ShiftMode):
            raise ConfigError(f"shift_mode must be one of {get_args(ShiftMode)}, got {shift_mode!r}")
        if not (math.isfinite(shift) and shift > 0):
            raise ConfigError(f"shift must be a positive number, got {shift!r}")
        if not (math.isfinite(base_shift) and math.isfinite(max_shift)):
            raise ConfigError(f"base_shift and max_shift must be finite, got {base_shift!r}, {max_shift!r}")
        base_len = _positive_int(base_image_seq_len, "base_image_seq_len", ConfigError)
        max_len = _positive_int(max_image_seq_len, "max_image_seq_len", ConfigError)
        if base_len == max_len:
            raise ConfigError(f"base_image_seq_len and max_image_seq_len must differ, both are {base_len}")
        if sigma_min is not None and not 0.0 < sigma_min < 1.0:
            raise ConfigError(f"sigma_min must be in (0, 1) or None (1/N), got {sigma_min!r}")
        self.shift_mode: ShiftMode = shift_mode
        self.shift = float(shift)
        self.base_shift = float(base_shift)
        self.max_shift = float(max_shift)
        self.base_image_seq_len = base_len
        self.max_image_seq_len = max_len
        self.num_train_timesteps = _positive_int(num_train_timesteps, "num_train_timesteps", ConfigError)
        self.sigma_min = None if sigma_min is None else float(sigma_min)
        self.sigmas: Tensor = torch.zeros(0, dtype=torch.float32)
        self.timesteps: Tensor = torch.zeros(0, dtype=torch.float32)
        self.num_inference_steps = 0
        self.mu: float | None = None
        self._training_grids: dict[tuple[object, ...], Tensor] = {}

    @classmethod
    def for_family(cls, family: Literal["flux1", "flux2"], **overrides: float | int | None) -> FlowMatchScheduler:
        """The scheduler a family's diffusers pipeline uses (``shift_mode=family``, FLUX defaults).

        Args:
            family: ``"flux1"`` or ``"flux2"``.
            **overrides: Other constructor arguments (``shift``, ``sigma_min``, ...).

        Returns:
            A new scheduler.

        Raises:
            ConfigError: Unknown family or bad override.
        """
        if family not in ("flux1", "flux2"):
            raise ConfigError(f"for_family() knows 'flux1' and 'flux2', got {family!r}")
        return cls(family, **overrides)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        config = (
            f"shift_mode={self.shift_mode!r}, shift={self.shift}, base_shift={self.base_shift}, "
            f"max_shift={self.max_shift}, base_image_seq_len={self.base_image_seq_len}, "
            f"max_image_seq_len={self.max_image_seq_len}, num_train_timesteps={self.num_train_timesteps}, "
            f"sigma_min={self.sigma_min}"
        )
        if not self.num_inference_steps:
            return f"FlowMatchScheduler({config})"
        mu = "none" if self.mu is None else f"{self.mu:.6g}"
        return f"FlowMatchScheduler({config}) [{self.num_inference_steps} steps, mu={mu}]"

    # ------------------------------------------------------------------------------------------------------
    # schedules
    # ------------------------------------------------------------------------------------------------------

    def resolve_mu(self, num_steps: int, image_seq_len: int | None = None, mu: float | None = None) -> float | None:
        """The exponential-shift ``mu`` an inference schedule of ``num_steps`` steps uses.

        Args:
            num_steps: Number of inference steps N.
            image_seq_len: Image tokens ``(H/16) * (W/16)``; needed by ``"flux1"``/``"flux2"`` unless
                ``mu`` is given, ignored otherwise.
            mu: Explicit value; returned as is.

        Returns:
            ``mu``, or None for ``"static"`` and ``"none"`` (no exponential shift).

        Raises:
            PipelineInputError: A resolution-dependent mode got neither ``image_seq_len`` nor ``mu``.
        """
        if mu is not None:
            if not math.isfinite(mu):
                raise PipelineInputError(f"mu must be a finite number, got {mu!r}")
            return float(mu)
        if self.shift_mode not in ("flux1", "flux2"):
            return None
        if image_seq_len is None:
            raise PipelineInputError(
                f"The {self.shift_mode!r} schedule depends on the resolution: pass "
                "image_seq_len=(height // 16) * (width // 16), or an explicit mu."
            )
        length = _positive_int(image_seq_len, "image_seq_len", PipelineInputError)
        if self.shift_mode == "flux1":
            return flux1_mu(
                length,
                base_image_seq_len=self.base_image_seq_len,
                max_image_seq_len=self.max_image_seq_len,
                base_shift=self.base_shift,
                max_shift=self.max_shift,
            )
        return flux2_empirical_mu(length, num_steps)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        *,
        image_seq_len: int | None = None,
        denoising_strength: float = 1.0,
        sigmas: Sequence[float] | Tensor | None = None,
        mu: float | None = None,
        shift_sigmas: bool = True,
    ) -> None:
        """Build the inference schedule: sets ``sigmas`` ``(N + 1,)``, ``timesteps`` ``(N,)``, ``mu``.

        Args:
            num_inference_steps: N. May be None when ``sigmas`` is given (then N is ``len(sigmas)``).
            image_seq_len: Image tokens ``(H/16) * (W/16)`` (the packed latent length); required by
                ``"flux1"``/``"flux2"`` unless ``mu`` is given.
            denoising_strength: Image-to-image strength in ``(0, 1]``; below 1 the schedule starts lower but
                keeps N steps (DiffSynth semantics, see the module docstring).
            sigmas: Explicit unshifted step-start sigmas, shape ``(N,)``, non-increasing, in ``(0, 1]``,
                without the final 0. Shifted like the default grid unless ``shift_sigmas=False``.
            mu: Explicit exponential-shift ``mu`` (overrides ``image_seq_len`` and ``shift_mode``).
            shift_sigmas: False uses the grid (default or explicit) without any shift.

        Raises:
            PipelineInputError: Invalid steps, strength, sigmas or missing resolution.
        """
        strength = self._check_strength(denoising_strength)
        if sigmas is not None:
            base = self._explicit_sigmas(sigmas)
            steps = base.numel()
            if num_inference_steps is not None and num_inference_steps != steps:
                raise PipelineInputError(
                    f"num_inference_steps={num_inference_steps} disagrees with the {steps} explicit sigmas; "
                    "pass one of them, or make them agree."
                )
            if strength != 1.0:
                raise PipelineInputError(
                    "denoising_strength cannot be combined with explicit sigmas: the sigmas already say "
                    "where denoising starts. Start them lower instead (e.g. drop the first few)."
                )
        else:
            if num_inference_steps is None:
                raise PipelineInputError("set_timesteps() needs num_inference_steps or explicit sigmas")
            steps = _positive_int(num_inference_steps, "num_inference_steps", PipelineInputError)
            base = self._grid(steps, strength)
        if shift_sigmas:
            used_mu = self.resolve_mu(steps, image_seq_len, mu)
            shifted = self._shift(base, used_mu, static=self.shift_mode == "static")
        else:
            if mu is not None:
                raise PipelineInputError("mu has no effect with shift_sigmas=False; pass one or the other")
            used_mu, shifted = None, base
        self.timesteps = shifted * self.num_train_timesteps
        self.sigmas = torch.cat([shifted, torch.zeros(1, dtype=torch.float32)])
        self.num_inference_steps = steps
        self.mu = used_mu

    def _grid(self, steps: int, strength: float) -> Tensor:
        """Unshifted float32 grid ``linspace(sigma_start, sigma_min, steps)``, rounded like NumPy's."""
        sigma_min = self.sigma_min if self.sigma_min is not None else 1.0 / steps
        start = img2img_start_sigma(strength, sigma_min)
        return linspace_float64(start, sigma_min, steps).to(torch.float32)

    def _shift(self, base: Tensor, mu: float | None, *, static: bool) -> Tensor:
        """Exponential shift with ``mu``; without one the static shift (``static``) or nothing."""
        if mu is not None:
            return time_shift_exponential(mu, 1.0, base)
        if static:
            return static_shift(self.shift, base)
        return base.clone()

    @staticmethod
    def _check_strength(denoising_strength: float) -> float:
        strength = float(denoising_strength)
        if not 0.0 < strength <= 1.0:
            raise PipelineInputError(
                f"denoising_strength must be in (0, 1] (1 = start from pure noise), got {denoising_strength!r}"
            )
        return strength

    @staticmethod
    def _explicit_sigmas(sigmas: Sequence[float] | Tensor) -> Tensor:
        """Validate explicit sigmas; return them as float32 ``(N,)`` on the CPU."""
        if isinstance(sigmas, Tensor):
            values = sigmas.detach().to("cpu")
        else:
            try:
                values = torch.as_tensor(sigmas, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise PipelineInputError(f"sigmas must be a sequence of numbers: {exc}") from None
        if values.dim() != 1 or values.numel() == 0 or not values.is_floating_point():
            raise PipelineInputError(
                f"sigmas must be a non-empty 1-D sequence of floats, got shape {tuple(values.shape)}"
            )
        values = values.to(torch.float32)
        if not bool(torch.isfinite(values).all()) or bool((values <= 0).any()) or bool((values > 1).any()):
            raise PipelineInputError(
                "sigmas must lie in (0, 1]; leave out the final 0.0, the scheduler appends it "
                f"(got min {float(values.min())}, max {float(values.max())})"
            )
        if values.numel() > 1 and bool((values[1:] > values[:-1]).any()):
            raise PipelineInputError("sigmas must be non-increasing (from noise towards the clean sample)")
        return values

    # ------------------------------------------------------------------------------------------------------
    # sampling
    # ------------------------------------------------------------------------------------------------------

    def step(self, velocity: Tensor, step_index: int, sample: Tensor) -> Tensor:
        """One Euler step ``sample + (sigmas[i + 1] - sigmas[i]) * velocity``.

        Computed like diffusers' ``FlowMatchEulerDiscreteScheduler.step``: the sample is upcast to float32
        (float64 stays float64), the product ``dt * velocity`` is taken in the velocity's dtype, and the
        result is cast back to the sample's dtype (diffusers casts to the velocity's dtype, and its pipelines
        then cast to the latents' dtype; the two agree whenever the dtypes agree).

        Args:
            velocity: Predicted velocity, same shape as ``sample`` (e.g. ``(B, tokens, channels)``).
            step_index: Index i of the step, ``0 <= i < num_inference_steps``.
            sample: Current sample at ``sigmas[i]``.

        Returns:
            The sample at ``sigmas[i + 1]``, same shape, dtype and device as ``sample``.

        Raises:
            PipelineInputError: No schedule, index out of range, or shape mismatch.
        """
        if not self.num_inference_steps:
            raise PipelineInputError("Call set_timesteps() before step()")
        try:
            index = operator.index(step_index)
        except TypeError:
            raise PipelineInputError(f"step_index must be an integer, got {step_index!r}") from None
        if isinstance(step_index, bool) or not 0 <= index < self.num_inference_steps:
            raise PipelineInputError(f"step_index must be in [0, {self.num_inference_steps}), got {step_index!r}")
        if velocity.shape != sample.shape:
            raise PipelineInputError(
                f"velocity {tuple(velocity.shape)} and sample {tuple(sample.shape)} must have the same shape"
            )
        dt = self.sigmas[index + 1] - self.sigmas[index]
        upcast = sample.to(torch.promote_types(sample.dtype, torch.float32))
        result: Tensor = (upcast + dt * velocity).to(sample.dtype)
        return result

    @staticmethod
    def _broadcast_sigma(sigma: float | Tensor, like: Tensor, dtype: torch.dtype) -> Tensor:
        """``sigma`` as a tensor that broadcasts against ``like`` ``(B, ...)``: 0-d, or ``(B, 1, ..., 1)``."""
        if not isinstance(sigma, Tensor):
            return torch.tensor(float(sigma), dtype=dtype, device=like.device)
        value = sigma.to(device=like.device, dtype=dtype)
        if value.dim() == 0 or (value.dim() == 1 and value.numel() == 1):
            return value.reshape(())
        if value.dim() == 1 and like.dim() >= 1 and value.numel() == like.shape[0]:
            return value.reshape((-1,) + (1,) * (like.dim() - 1))
        raise PipelineInputError(
            f"sigma must be a number, a 0-d tensor or one value per batch item (shape ({like.shape[0]},)); "
            f"got shape {tuple(value.shape)} for a sample of shape {tuple(like.shape)}"
        )

    def add_noise(self, original: Tensor, noise: Tensor, sigma: float | Tensor) -> Tensor:
        """Forward process ``(1 - sigma) * original + sigma * noise``.

        Args:
            original: Clean sample ``x0``, shape ``(B, ...)``.
            noise: Gaussian noise, same shape.
            sigma: A number, a 0-d tensor, or a tensor ``(B,)`` (one sigma per batch item).

        Returns:
            The noisy sample, same shape and dtype as ``original`` (computed in at least float32).

        Raises:
            PipelineInputError: Shapes do not match.
        """
        if original.shape != noise.shape:
            raise PipelineInputError(
                f"original {tuple(original.shape)} and noise {tuple(noise.shape)} must have the same shape"
            )
        dtype = torch.promote_types(original.dtype, torch.float32)
        s = self._broadcast_sigma(sigma, original, dtype)
        noisy = s * noise.to(dtype) + (1.0 - s) * original.to(dtype)
        return noisy.to(original.dtype)

    @staticmethod
    def velocity_target(original: Tensor, noise: Tensor) -> Tensor:
        """Training target of flow matching, ``noise - original``, same shape as the inputs."""
        if original.shape != noise.shape:
            raise PipelineInputError(
                f"original {tuple(original.shape)} and noise {tuple(noise.shape)} must have the same shape"
            )
        return noise - original

    def velocity_towards(self, sample: Tensor, original: Tensor, sigma: float | Tensor) -> Tensor:
        """The velocity that keeps ``sample`` on ``original``'s trajectory: ``(sample - original) / sigma``.

        Used for inpainting: blending it into the prediction where the mask is 0 makes the Euler step land
        on ``add_noise(original, noise, sigma_next)`` for the same noise.

        Args:
            sample: Current sample at ``sigma``, shape ``(B, ...)``.
            original: Clean sample, same shape.
            sigma: Current sigma (> 0): a number, a 0-d tensor or ``(B,)``.

        Returns:
            Velocity, same shape and dtype as ``sample``.

        Raises:
            PipelineInputError: ``sigma`` is not positive, or shapes do not match.
        """
        if sample.shape != original.shape:
            raise PipelineInputError(
                f"sample {tuple(sample.shape)} and original {tuple(original.shape)} must have the same shape"
            )
        if not isinstance(sigma, Tensor) and not sigma > 0:
            raise PipelineInputError(f"sigma must be > 0 to recover a velocity, got {sigma!r}")
        dtype = torch.promote_types(sample.dtype, torch.float32)
        s = self._broadcast_sigma(sigma, sample, dtype)
        velocity = (sample.to(dtype) - original.to(dtype)) / s
        return velocity.to(sample.dtype)
