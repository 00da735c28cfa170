"""Pure functions behind the flow-matching schedules of FLUX.1 and FLUX.2.

Everything here is stateless and deterministic: plain floats in, plain floats or tensors out.
:class:`diffstudio.scheduler.FlowMatchScheduler` composes these functions; plugins and tests may call them
directly.

Conventions: ``sigma`` is the noise level of the rectified-flow interpolation ``x_sigma = (1 - sigma) * x0 +
sigma * noise``, 1.0 is pure noise and 0.0 the clean sample. Schedules run from high to low sigma.

The numerics follow diffusers (``FlowMatchEulerDiscreteScheduler`` fed by ``FluxPipeline`` and
``Flux2Pipeline``) operation for operation, in the same dtypes, so the results are bit-identical on CPU:

* the unshifted grid is built in float64 the way ``numpy.linspace`` builds it, then rounded to float32;
* every shift is evaluated in float32 with the Python-float constants rounded to float32, as NumPy does.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import Tensor

__all__ = [
    "FLUX2_TRAINING_MU",
    "bump_weighting",
    "flux1_mu",
    "flux2_empirical_mu",
    "img2img_start_sigma",
    "linspace_float64",
    "static_shift",
    "time_shift_exponential",
]

#: The fixed ``mu`` DiffSynth uses for the FLUX.2 training grid (no resolution dependence).
FLUX2_TRAINING_MU = 0.8


def flux1_mu(
    image_seq_len: int,
    *,
    base_image_seq_len: int = 256,
    max_image_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Resolution-dependent shift exponent of FLUX.1: a line through two (sequence length, mu) points.

    Equal, operation for operation, to diffusers' ``calculate_shift``: ``mu = base_shift`` at
    ``base_image_seq_len`` tokens and ``max_shift`` at ``max_image_seq_len`` tokens, extrapolated linearly
    outside that range (no clamping).

    Args:
        image_seq_len: Number of image tokens, ``(H / 16) * (W / 16)`` for FLUX.1 and FLUX.2.
        base_image_seq_len: Sequence length at which ``mu == base_shift``.
        max_image_seq_len: Sequence length at which ``mu == max_shift``.
        base_shift: ``mu`` at the base length.
        max_shift: ``mu`` at the max length.

    Returns:
        The shift exponent ``mu`` (a Python float).
    """
    slope = (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len)
    intercept = base_shift - slope * base_image_seq_len
    return image_seq_len * slope + intercept


# The two empirical fits of FLUX.2 (mu as a line in the sequence length): one for 10 steps, one for 200 steps.
_MU_FIT_10_STEPS = (8.73809524e-05, 1.89833333)
_MU_FIT_200_STEPS = (0.00016927, 0.45666666)
_MU_LONG_SEQUENCE = 4300


def flux2_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """Resolution- and step-dependent shift exponent of FLUX.2 (BFL's empirical fit).

    Two linear fits in the sequence length, one measured at 10 and one at 200 steps, interpolated (and
    extrapolated) linearly in the number of steps. Above 4300 tokens only the 200-step fit is used, whatever
    the step count. Equal to diffusers' ``compute_empirical_mu``.

    Args:
        image_seq_len: Number of image tokens, ``(H / 16) * (W / 16)``.
        num_steps: Number of inference steps.

    Returns:
        The shift exponent ``mu`` (a Python float).
    """
    slope_10, offset_10 = _MU_FIT_10_STEPS
    slope_200, offset_200 = _MU_FIT_200_STEPS
    mu_200 = slope_200 * image_seq_len + offset_200
    if image_seq_len > _MU_LONG_SEQUENCE:
        return float(mu_200)
    mu_10 = slope_10 * image_seq_len + offset_10
    per_step = (mu_200 - mu_10) / 190.0
    at_zero_steps = mu_200 - 200.0 * per_step
    return float(per_step * num_steps + at_zero_steps)


def time_shift_exponential(mu: float, sigma_power: float, sigmas: Tensor) -> Tensor:
    """Exponential time shift ``e^mu / (e^mu + (1/sigma - 1)^sigma_power)``.

    With ``sigma_power == 1`` this is the static shift with factor ``s = e^mu`` (``mu = log(3)`` is FLUX.1's
    ``shift=3``), and ``mu = 0`` leaves the sigmas unchanged. A sigma of 0 maps to 0 and 1 maps to 1.

    Args:
        mu: Shift exponent; larger values spend more steps at high noise.
        sigma_power: Exponent applied to ``1/sigma - 1`` (diffusers' ``sigma`` argument; 1.0 for FLUX).
        sigmas: Sigmas in ``[0, 1]``, any shape; the computation runs in their dtype.

    Returns:
        The shifted sigmas, same shape and dtype as ``sigmas``.
    """
    # A 0-d tensor, not a Python float: torch evaluates ``float / tensor`` as ``float * reciprocal(tensor)``,
    # which rounds differently from NumPy's true division.
    scale = torch.tensor(math.exp(mu), dtype=sigmas.dtype, device=sigmas.device)
    shifted: Tensor = scale / (scale + (1.0 / sigmas - 1.0) ** sigma_power)
    return shifted


def static_shift(shift: float, sigmas: Tensor) -> Tensor:
    """Static (resolution-independent) shift ``s * sigma / (1 + (s - 1) * sigma)``.

    Used by diffusers' scheduler without dynamic shifting and by DiffSynth's FLUX.1 schedule (``s = 3``).

    Args:
        shift: Shift factor ``s > 0``; 1.0 is the identity.
        sigmas: Sigmas in ``[0, 1]``, any shape; the computation runs in their dtype.

    Returns:
        The shifted sigmas, same shape and dtype as ``sigmas``.
    """
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def linspace_float64(start: float, stop: float, num: int) -> Tensor:
    """``num`` evenly spaced float64 values from ``start`` to ``stop`` inclusive, rounded like NumPy's.

    ``torch.linspace`` fills its two halves from opposite ends and can differ from ``numpy.linspace`` in the
    last bit; this reproduces NumPy (``i * step + start``, last value exactly ``stop``), which is what the
    diffusers pipelines use to build their sigma grids.

    Args:
        start: First value.
        stop: Last value (included).
        num: Number of values, at least 1; with 1 the result is ``[start]``.

    Returns:
        A float64 tensor of shape ``(num,)``.
    """
    values = torch.arange(num, dtype=torch.float64)
    if num > 1:
        values = values * ((stop - start) / (num - 1)) + start
        values[-1] = stop
    else:
        values = values + start
    return values


def img2img_start_sigma(denoising_strength: float, sigma_min: float) -> float:
    """First (unshifted) sigma of an image-to-image schedule, DiffSynth's convention.

    ``sigma_start = sigma_min + (1 - sigma_min) * strength``: strength 1 starts from pure noise, and a
    strength near 0 starts at the schedule's last sigma. The value is exactly 1.0 for strength 1.

    Args:
        denoising_strength: Strength in ``(0, 1]``.
        sigma_min: Last sigma of the unshifted grid.

    Returns:
        The unshifted start sigma.
    """
    if denoising_strength == 1.0:
        return 1.0
    return sigma_min + (1.0 - sigma_min) * denoising_strength


def bump_weighting(sigmas: Tensor, grid: Tensor, num_train_timesteps: int = 1000) -> Tensor:
    """DiffSynth's Gaussian-bump loss weight over timesteps, evaluated at ``sigmas``.

    The bump is ``g(t) = exp(-2 * ((t - T/2) / T)^2)`` with ``t = sigma * T`` and ``T = num_train_timesteps``.
    It is offset so that its minimum over ``grid`` (the training sigmas) is 0 and scaled so that its mean over
    ``grid`` is 1 (its sum is ``G``, which is ``T`` for the scheduler's training grid). Sigmas off the grid
    get the same affine map of the bump (they are not snapped to the nearest grid point), so values on the
    grid equal DiffSynth's.

    Args:
        sigmas: Sigmas to weigh, any shape.
        grid: The training sigmas, shape ``(G,)``, that fix the normalisation.
        num_train_timesteps: ``T``.

    Returns:
        Float32 weights, same shape as ``sigmas``; >= 0 on the grid, 0 at the grid point farthest from
        ``T/2``.
    """
    half = num_train_timesteps / 2

    def bump(values: Tensor) -> Tensor:
        timesteps = values.to(torch.float32) * num_train_timesteps
        return torch.exp(-2 * ((timesteps - half) / num_train_timesteps) ** 2)

    on_grid = bump(grid)
    floor = on_grid.min()
    scale = grid.numel() / (on_grid - floor).sum()
    weights: Tensor = (bump(sigmas) - floor) * scale
    return weights


def positive_int(value: object, name: str, error: type[Exception]) -> int:
    """``value`` as an int >= 1 (bools and non-integers refused), else ``error`` naming ``name``."""
    if isinstance(value, bool):
        raise error(f"{name} must be a positive integer, got {value!r}")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise error(f"{name} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise error(f"{name} must be a positive integer, got {value!r}")
    return int(number)
