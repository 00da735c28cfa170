"""Training sigmas of flow matching: the shifted training grid, sigma sampling and the loss weighting.

The training half of :class:`diffstudio.scheduler.FlowMatchScheduler`, which inherits :class:`TrainingSigmas`
(so ``scheduler.sample_training_sigmas(...)`` is unchanged); the inference schedule and the Euler step stay in
:mod:`diffstudio.scheduler`. Training follows DiffSynth: sigmas are drawn from a 1000-point grid shifted like an
inference schedule (``mu = 0.8`` for FLUX.2, static shift 3 for FLUX.1, or the family's ``mu`` when
``image_seq_len`` is given), and the loss is weighted by DiffSynth's Gaussian bump over timesteps.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal, get_args

import torch
from torch import Tensor

from diffstudio.errors import PipelineInputError
from diffstudio.schedules import FLUX2_TRAINING_MU, bump_weighting, flux2_empirical_mu, positive_int

__all__ = ["LossWeighting", "TimestepSampling", "TrainingSigmas"]

TimestepSampling = Literal["uniform", "logit_normal", "mode"]
LossWeighting = Literal["bump", "none"]

# With ``image_seq_len`` given, FLUX.2 training uses the 200-step fit of the empirical mu: the fit is only
# measured between 10 and 200 steps, and extrapolating it to a 1000-point grid gives meaningless values.
_FLUX2_TRAINING_FIT_STEPS = 200
_positive_int = positive_int


class TrainingSigmas:
    """Training grid, sigma sampling and loss weights of a flow-matching scheduler (mixed into the scheduler).

    Uses the scheduler's configuration (``shift_mode``, ``shift``, ``num_train_timesteps``, ...) and its grid
    and shift (``_grid``, ``_shift``, ``resolve_mu``).
    """

    if TYPE_CHECKING:
        shift_mode: str
        shift: float
        base_shift: float
        max_shift: float
        base_image_seq_len: int
        max_image_seq_len: int
        num_train_timesteps: int
        sigma_min: float | None
        _training_grids: dict[tuple[object, ...], Tensor]

        def _grid(self, steps: int, strength: float) -> Tensor: ...

        def _shift(self, base: Tensor, mu: float | None, *, static: bool) -> Tensor: ...

        def resolve_mu(
            self, num_steps: int, image_seq_len: int | None = None, mu: float | None = None
        ) -> float | None:
            """The exponential-shift ``mu`` of a schedule (see ``FlowMatchScheduler.resolve_mu``)."""


    def training_sigmas(self, image_seq_len: int | None = None, *, mu: float | None = None) -> Tensor:
        """The training grid: ``num_train_timesteps`` shifted sigmas, float32 ``(T,)``, decreasing from 1.

        The unshifted grid is ``linspace(1, sigma_min, T)`` (``sigma_min = 1/T`` unless configured).
        The shift:

        * explicit ``mu``: exponential with it;
        * ``"flux2"``: ``mu = 0.8`` (DiffSynth), or with ``image_seq_len`` the 200-step empirical fit;
        * ``"flux1"``: the static shift ``shift`` (DiffSynth: 3), or with ``image_seq_len`` ``flux1_mu``;
        * ``"static"``: the static shift; ``"none"``: none.

        Args:
            image_seq_len: Optional image tokens ``(H/16) * (W/16)`` for a resolution-dependent grid.
            mu: Explicit exponential-shift ``mu``.

        Returns:
            Float32 tensor ``(T,)`` on the CPU.
        """
        key = (image_seq_len, mu, self.shift_mode, self.shift, self.base_shift, self.max_shift,
               self.base_image_seq_len, self.max_image_seq_len, self.num_train_timesteps, self.sigma_min)  # fmt: skip
        grid = self._training_grids.get(key)
        if grid is None:  # training asks for the same grid for every sample of every step
            if len(self._training_grids) >= 32:
                self._training_grids.clear()
            grid = self._training_grids[key] = self._training_grid(image_seq_len, mu)
        return grid.clone()

    def _training_grid(self, image_seq_len: int | None, mu: float | None) -> Tensor:
        base = self._grid(self.num_train_timesteps, 1.0)
        if mu is None and image_seq_len is not None and self.shift_mode == "flux2":
            length = _positive_int(image_seq_len, "image_seq_len", PipelineInputError)
            mu = flux2_empirical_mu(length, _FLUX2_TRAINING_FIT_STEPS)
        elif mu is None and image_seq_len is not None and self.shift_mode == "flux1":
            mu = self.resolve_mu(self.num_train_timesteps, image_seq_len)
        elif mu is None and self.shift_mode == "flux2":
            mu = FLUX2_TRAINING_MU
        elif mu is not None and not math.isfinite(mu):
            raise PipelineInputError(f"mu must be a finite number, got {mu!r}")
        return self._shift(base, mu, static=self.shift_mode in ("flux1", "static"))

    def sample_training_sigmas(
        self,
        batch_size: int,
        *,
        generator: torch.Generator | None,
        image_seq_len: int | None = None,
        device: torch.device | str | None = None,
        timestep_sampling: TimestepSampling = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        min_boundary: float = 0.0,
        max_boundary: float = 1.0,
        mu: float | None = None,
    ) -> Tensor:
        """Draw one training sigma per batch item from the training grid (``training_sigmas``).

        A grid index is drawn in ``[int(min_boundary * T), int(max_boundary * T))`` and its sigma returned:

        * ``"uniform"``: uniform index (DiffSynth's FLUX training);
        * ``"logit_normal"``: ``u = sigmoid(N(logit_mean, logit_std))``, index ``floor(u * range)``, as
          diffusers' ``compute_density_for_timestep_sampling`` followed by its FLUX training scripts;
        * ``"mode"``: diffusers' mode sampling with ``mode_scale``.

        Index 0 is sigma 1 (pure noise), so ``u`` near 0 means high noise, as in diffusers.

        Args:
            batch_size: B.
            generator: Source of randomness (None: torch's global generator, not reproducible).
            image_seq_len: Optional resolution for the grid's shift (see ``training_sigmas``).
            device: Device of the result (default: CPU).
            timestep_sampling: ``"uniform"``, ``"logit_normal"`` or ``"mode"``.
            logit_mean: Mean of the logit-normal.
            logit_std: Standard deviation of the logit-normal (> 0).
            mode_scale: Scale of the ``"mode"`` density.
            min_boundary: Lower end of the index range, as a fraction of T, in ``[0, 1)``.
            max_boundary: Upper end of the index range, as a fraction of T, in ``(0, 1]``.
            mu: Explicit exponential-shift ``mu`` of the grid.

        Returns:
            Float32 tensor ``(B,)`` of sigmas in ``(0, 1]``.

        Raises:
            PipelineInputError: Invalid batch size, sampling name or boundaries.
        """
        batch = _positive_int(batch_size, "batch_size", PipelineInputError)
        if timestep_sampling not in get_args(TimestepSampling):
            raise PipelineInputError(
                f"timestep_sampling must be one of {get_args(TimestepSampling)}, got {timestep_sampling!r}"
            )
        total = self.num_train_timesteps
        low, high = int(min_boundary * total), int(max_boundary * total)
        if not (0.0 <= min_boundary < max_boundary <= 1.0) or low >= high:
            raise PipelineInputError(
                f"Need 0 <= min_boundary < max_boundary <= 1 covering at least one of {total} timesteps, "
                f"got {min_boundary!r}, {max_boundary!r}"
            )
        if not (math.isfinite(logit_std) and logit_std > 0):
            raise PipelineInputError(f"logit_std must be > 0, got {logit_std!r}")
        grid = self.training_sigmas(image_seq_len, mu=mu)
        draw_device = generator.device if generator is not None else torch.device("cpu")
        if timestep_sampling == "uniform":
            index = torch.randint(low, high, (batch,), generator=generator, device=draw_device)
        else:
            if timestep_sampling == "logit_normal":
                normal = torch.normal(logit_mean, logit_std, size=(batch,), generator=generator, device=draw_device)
                u = torch.sigmoid(normal)
            else:
                u = torch.rand((batch,), generator=generator, device=draw_device)
                u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
            index = low + (u * (high - low)).long().clamp(0, high - low - 1)
        return grid[index.cpu()].to(device if device is not None else "cpu")

    def training_weight(
        self,
        sigmas: Tensor,
        *,
        weighting: LossWeighting = "bump",
        image_seq_len: int | None = None,
        mu: float | None = None,
    ) -> Tensor:
        """Per-sample loss weight for training sigmas.

        ``"bump"`` is DiffSynth's weighting: ``exp(-2 * ((t - T/2) / T)^2)`` over timesteps ``t = sigma * T``,
        offset so its minimum over the training grid is 0 (at sigma 1) and scaled so its mean over the grid
        is 1 (sum T). Pass the same ``image_seq_len``/``mu`` as to ``sample_training_sigmas``: the grid fixes
        the normalisation. ``"none"`` gives ones.

        Args:
            sigmas: Sigmas, any shape, typically ``(B,)``.
            weighting: ``"bump"`` or ``"none"``.
            image_seq_len: Resolution of the training grid (see ``training_sigmas``).
            mu: Explicit ``mu`` of the training grid.

        Returns:
            Float32 weights, same shape and device as ``sigmas``; > 0 for sigmas in ``(0, 1)``.

        Raises:
            PipelineInputError: Unknown weighting.
        """
        if weighting == "none":
            return torch.ones(sigmas.shape, dtype=torch.float32, device=sigmas.device)
        if weighting != "bump":
            raise PipelineInputError(f"weighting must be one of {get_args(LossWeighting)}, got {weighting!r}")
        grid = self.training_sigmas(image_seq_len, mu=mu)
        weights = bump_weighting(sigmas.detach().to("cpu"), grid, self.num_train_timesteps)
        return weights.to(sigmas.device)
