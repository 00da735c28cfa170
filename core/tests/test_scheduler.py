"""FlowMatchScheduler: parity with diffusers' FLUX.1 / FLUX.2 schedules and Euler step, DiffSynth's img2img
and training conventions, and typed errors for bad input."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffstudio import FlowMatchScheduler as LazyExport  # noqa: E402
from diffstudio.errors import ConfigError, PipelineInputError  # noqa: E402
from diffstudio.scheduler import FlowMatchScheduler, flux1_mu, flux2_empirical_mu  # noqa: E402
from diffstudio.schedules import bump_weighting, linspace_float64, static_shift, time_shift_exponential  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps  # noqa: E402
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu  # noqa: E402
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.training_utils import compute_density_for_timestep_sampling  # noqa: E402

# scheduler/scheduler_config.json of black-forest-labs/FLUX.1-dev; the FLUX.2 repos (dev, klein) ship the same
# dynamic-shifting configuration, and their pipelines pass mu = compute_empirical_mu(...) to it.
FLUX_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "time_shift_type": "exponential",
}
STEPS = (1, 2, 4, 20, 28, 50)
RESOLUTIONS = ((256, 256), (512, 512), (768, 1360), (1024, 1024), (2048, 2048), (1440, 2560))
TOL = 1e-6


def seq_len(height: int, width: int) -> int:
    return (height // 16) * (width // 16)


def diffusers_schedule(family: str, steps: int, length: int, sigmas: Any = None) -> Any:
    """What FluxPipeline / Flux2Pipeline do before their denoising loop."""
    scheduler: Any = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG)
    if sigmas is None:
        sigmas = np.linspace(1.0, 1 / steps, steps)
    if family == "flux1":
        cfg = scheduler.config
        mu = calculate_shift(
            length, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift
        )
    else:
        mu = compute_empirical_mu(image_seq_len=length, num_steps=steps)
    retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, mu=mu)
    return scheduler


def max_diff(a: torch.Tensor, b: Any) -> float:
    b = torch.as_tensor(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.double() - b.double()).abs().max())


# ------------------------------------------------------------------------------------------------------------
# pure functions
# ------------------------------------------------------------------------------------------------------------


def test_mu_functions_equal_diffusers() -> None:
    for length in (1, 256, 1024, 4080, 4096, 4300, 4301, 16384, 20000):
        assert flux1_mu(length) == calculate_shift(length)
        for steps in (1, 4, 10, 28, 50, 200, 1000):
            assert flux2_empirical_mu(length, steps) == compute_empirical_mu(length, steps)


def test_shift_functions() -> None:
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.01, 0.0])
    # the static shift s is the exponential shift with mu = log(s); mu = 0 is the identity
    assert max_diff(static_shift(3.0, sigmas), time_shift_exponential(math.log(3.0), 1.0, sigmas)) <= TOL
    assert torch.equal(time_shift_exponential(0.0, 1.0, sigmas), sigmas)
    assert time_shift_exponential(1.1, 1.0, sigmas)[[0, -1]].tolist() == [1.0, 0.0]
    assert torch.equal(linspace_float64(1.0, 0.02, 50), torch.as_tensor(np.linspace(1.0, 0.02, 50)))
    assert linspace_float64(0.7, 0.1, 1).tolist() == [0.7]


# ------------------------------------------------------------------------------------------------------------
# inference schedules: parity with diffusers
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["flux1", "flux2"])
@pytest.mark.parametrize("height,width", RESOLUTIONS)
def test_schedule_matches_diffusers(family: str, height: int, width: int) -> None:
    ours = FlowMatchScheduler.for_family(family)  # type: ignore[arg-type]
    length = seq_len(height, width)
    for steps in STEPS:
        reference = diffusers_schedule(family, steps, length)
        ours.set_timesteps(steps, image_seq_len=length)
        assert ours.sigmas.dtype == torch.float32 and ours.timesteps.dtype == torch.float32
        assert ours.sigmas.shape == (steps + 1,) and ours.timesteps.shape == (steps,)
        assert ours.sigmas[-1].item() == 0.0
        assert max_diff(ours.sigmas, reference.sigmas) <= TOL
        assert max_diff(ours.timesteps, reference.timesteps) <= TOL * 1000
        # in fact bit-identical
        assert torch.equal(ours.sigmas, reference.sigmas) and torch.equal(ours.timesteps, reference.timesteps)


def test_flux1_and_flux2_differ_and_default_is_flux2() -> None:
    a, b = FlowMatchScheduler(), FlowMatchScheduler("flux1")
    assert a.shift_mode == "flux2" and LazyExport is FlowMatchScheduler
    a.set_timesteps(28, image_seq_len=4096)
    b.set_timesteps(28, image_seq_len=4096)
    assert a.mu == compute_empirical_mu(4096, 28) and b.mu == calculate_shift(4096)
    assert max_diff(a.sigmas, b.sigmas) > 1e-3


@pytest.mark.parametrize("family", ["flux1", "flux2"])
def test_explicit_sigmas_are_shifted_like_diffusers(family: str) -> None:
    custom = [1.0, 0.9, 0.7, 0.45, 0.2, 0.05]
    length = seq_len(768, 1360)
    reference = diffusers_schedule(family, len(custom), length, sigmas=custom)
    ours = FlowMatchScheduler.for_family(family)  # type: ignore[arg-type]
    for given in (custom, torch.tensor(custom, dtype=torch.float64), np.array(custom)):
        ours.set_timesteps(image_seq_len=length, sigmas=given)  # type: ignore[arg-type]
        assert torch.equal(ours.sigmas, reference.sigmas)
        assert torch.equal(ours.timesteps, reference.timesteps)
    ours.set_timesteps(len(custom), image_seq_len=length, sigmas=custom, shift_sigmas=False)
    assert torch.equal(ours.sigmas, torch.tensor([*custom, 0.0], dtype=torch.float32))
    assert mu_of(ours) is None
    # an explicit mu is used as given
    ours.set_timesteps(image_seq_len=length, sigmas=custom, mu=0.9)
    assert mu_of(ours) == 0.9
    assert max_diff(ours.sigmas[:-1], time_shift_exponential(0.9, 1.0, torch.tensor(custom))) == 0.0


def mu_of(scheduler: FlowMatchScheduler) -> float | None:
    return scheduler.mu


def test_static_mode_matches_diffusers_static_shift_and_diffsynth_flux1() -> None:
    steps = 20
    grid = np.linspace(1.0, 1 / steps, steps)
    reference: Any = FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(sigmas=grid)
    ours = FlowMatchScheduler("static", shift=3.0)
    ours.set_timesteps(steps, image_seq_len=4096)  # the resolution does not matter here
    assert torch.equal(ours.sigmas, reference.sigmas) and ours.mu is None
    # DiffSynth's FLUX.1 schedule: linspace(1, 0.003/1.002, N), then shift 3
    diffsynth = FlowMatchScheduler("static", shift=3.0, sigma_min=0.003 / 1.002)
    diffsynth.set_timesteps(steps)
    base = torch.linspace(1.0, 0.003 / 1.002, steps)
    assert max_diff(diffsynth.sigmas[:-1], 3 * base / (1 + 2 * base)) <= TOL
    none = FlowMatchScheduler("none")
    none.set_timesteps(4)
    assert torch.equal(none.sigmas, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


# ------------------------------------------------------------------------------------------------------------
# image-to-image (DiffSynth semantics)
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strength", [0.1, 0.35, 0.6, 0.999])
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_img2img_schedule(strength: float, steps: int) -> None:
    length = seq_len(1024, 1024)
    ours = FlowMatchScheduler("flux2")
    ours.set_timesteps(steps, image_seq_len=length, denoising_strength=strength)
    sigma_min = 1 / steps
    start = sigma_min + (1 - sigma_min) * strength
    mu = compute_empirical_mu(length, steps)
    expected = [math.exp(mu) / (math.exp(mu) + 1 / s - 1) for s in np.linspace(start, sigma_min, steps)]
    assert ours.num_inference_steps == steps and ours.sigmas.shape == (steps + 1,)
    assert max_diff(ours.sigmas[:-1], torch.tensor(expected)) <= TOL
    assert ours.sigmas[0].item() < 1.0 or steps == 1
    assert bool((ours.sigmas[1:] < ours.sigmas[:-1]).all()) or steps == 1
    full = FlowMatchScheduler("flux2")
    full.set_timesteps(steps, image_seq_len=length)
    assert bool((ours.sigmas <= full.sigmas + TOL).all())
    assert ours.sigmas[-2].item() == pytest.approx(full.sigmas[-2].item(), abs=TOL)


def test_strength_one_is_text_to_image() -> None:
    a, b = FlowMatchScheduler("flux1"), FlowMatchScheduler("flux1")
    a.set_timesteps(28, image_seq_len=1024)
    b.set_timesteps(28, image_seq_len=1024, denoising_strength=1.0)
    assert torch.equal(a.sigmas, b.sigmas) and a.sigmas[0].item() == 1.0


# ------------------------------------------------------------------------------------------------------------
# Euler step and noise helpers
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["flux1", "flux2"])
def test_step_matches_diffusers(family: str, dtype: torch.dtype) -> None:
    steps, length = 6, seq_len(512, 768)
    reference = diffusers_schedule(family, steps, length)
    ours = FlowMatchScheduler.for_family(family)  # type: ignore[arg-type]
    ours.set_timesteps(steps, image_seq_len=length)
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, length, 64, generator=gen).to(dtype)
    theirs = sample.clone()
    for index, timestep in enumerate(reference.timesteps):
        velocity = torch.randn(2, length, 64, generator=gen).to(dtype)
        theirs = reference.step(velocity, timestep, theirs, return_dict=False)[0]
        sample = ours.step(velocity, index, sample)
        assert sample.dtype == dtype and sample.shape == theirs.shape
        assert max_diff(sample, theirs) <= TOL
        assert torch.equal(sample, theirs)


def test_add_noise_velocity_helpers() -> None:
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 16, 8, generator=gen), torch.randn(3, 16, 8, generator=gen)
    ours = FlowMatchScheduler("flux2")
    assert torch.allclose(ours.add_noise(x0, noise, 0.3), 0.7 * x0 + 0.3 * noise, atol=TOL)
    per_batch = torch.tensor([0.0, 0.5, 1.0])
    noisy = ours.add_noise(x0, noise, per_batch)
    assert torch.equal(noisy[0], x0[0]) and torch.equal(noisy[2], noise[2])
    assert torch.allclose(noisy[1], 0.5 * (x0[1] + noise[1]), atol=TOL)
    assert ours.add_noise(x0.bfloat16(), noise.bfloat16(), torch.tensor(0.2)).dtype == torch.bfloat16
    assert torch.equal(ours.velocity_target(x0, noise), noise - x0)
    # following velocity_towards keeps a sample on the input's trajectory (inpainting)
    ours.set_timesteps(5, image_seq_len=64)
    sample = ours.add_noise(x0, noise, ours.sigmas[1])
    velocity = ours.velocity_towards(sample, x0, ours.sigmas[1])
    assert torch.allclose(velocity, noise - x0, atol=1e-5)
    landed = ours.step(velocity, 1, sample)
    assert torch.allclose(landed, ours.add_noise(x0, noise, ours.sigmas[2]), atol=1e-5)
    recovered = ours.velocity_towards(noisy[1:], x0[1:], per_batch[1:])
    assert torch.allclose(recovered, (noise - x0)[1:], atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------------------


def test_training_grids_follow_diffsynth() -> None:
    base = np.linspace(1.0, 1 / 1000, 1000)
    flux2 = FlowMatchScheduler("flux2").training_sigmas()
    expected2 = [math.exp(0.8) / (math.exp(0.8) + 1 / s - 1) for s in base]
    assert flux2.shape == (1000,) and max_diff(flux2, torch.tensor(expected2)) <= TOL
    flux1 = FlowMatchScheduler("flux1").training_sigmas()
    assert max_diff(flux1, torch.from_numpy(3 * base / (1 + 2 * base))) <= TOL
    resolved = FlowMatchScheduler("flux2").training_sigmas(4096)
    mu = compute_empirical_mu(4096, 200)
    assert max_diff(resolved, torch.tensor([math.exp(mu) / (math.exp(mu) + 1 / s - 1) for s in base])) <= TOL
    assert max_diff(FlowMatchScheduler("flux1").training_sigmas(mu=0.0), torch.from_numpy(base)) <= TOL


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "mode"])
def test_sample_training_sigmas(sampling: str) -> None:
    ours = FlowMatchScheduler("flux2")
    grid = ours.training_sigmas()

    def draw(seed: int, **kw: Any) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        kw["timestep_sampling"] = sampling
        return ours.sample_training_sigmas(256, generator=gen, **kw)

    sigmas = draw(0)
    assert sigmas.shape == (256,) and sigmas.dtype == torch.float32
    assert bool((sigmas > 0).all()) and bool((sigmas <= 1).all())
    assert bool(torch.isin(sigmas, grid).all())
    assert torch.equal(sigmas, draw(0)) and not torch.equal(sigmas, draw(1))
    upper = draw(2, min_boundary=0.5)
    assert bool((upper <= grid[500]).all())
    lower = draw(3, max_boundary=0.25)
    assert bool((lower >= grid[249]).all())


def test_logit_normal_matches_diffusers_density() -> None:
    ours = FlowMatchScheduler("flux2")
    u = compute_density_for_timestep_sampling(
        "logit_normal", 64, logit_mean=0.3, logit_std=1.2, generator=torch.Generator().manual_seed(5)
    )
    expected = ours.training_sigmas()[(u * 1000).long()]
    got = ours.sample_training_sigmas(
        64, generator=torch.Generator().manual_seed(5), timestep_sampling="logit_normal", logit_mean=0.3,
        logit_std=1.2,
    )
    assert torch.equal(got, expected)


def test_training_weight() -> None:
    for mode in ("flux1", "flux2"):
        ours = FlowMatchScheduler(mode)
        grid = ours.training_sigmas()
        weights = ours.training_weight(grid)
        # DiffSynth: bump over t = sigma * 1000, offset to a minimum of 0, normalised to sum 1000
        t = grid.double() * 1000
        bump = torch.exp(-2 * ((t - 500) / 1000) ** 2)
        expected = (bump - bump.min()) * (1000 / (bump - bump.min()).sum())
        assert max_diff(weights, expected) <= 1e-5
        assert float(weights.sum()) == pytest.approx(1000.0, rel=1e-5)
        assert weights[0].item() == 0.0 and bool((weights[1:] > 0).all())
        gen = torch.Generator().manual_seed(0)
        sampled = ours.sample_training_sigmas(32, generator=gen, min_boundary=0.01)
        assert bool((ours.training_weight(sampled) > 0).all())
        assert torch.equal(ours.training_weight(sampled, weighting="none"), torch.ones(32))
    assert bump_weighting(torch.tensor([0.5]), torch.linspace(1.0, 0.001, 1000)).item() > 1.0


# ------------------------------------------------------------------------------------------------------------
# errors and misc
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_inference_steps": 4, "denoising_strength": 0.0},
        {"num_inference_steps": 4, "denoising_strength": 1.5},
        {"num_inference_steps": 4, "denoising_strength": -0.2},
        {"num_inference_steps": 0},
        {"num_inference_steps": -3},
        {"num_inference_steps": 2.5},
        {"num_inference_steps": True},
        {},
        {"num_inference_steps": 4, "image_seq_len": None},
        {"num_inference_steps": 4, "image_seq_len": 0},
        {"sigmas": [1.0, 0.5, 0.0]},
        {"sigmas": [0.5, 1.0]},
        {"sigmas": [1.5, 0.5]},
        {"sigmas": []},
        {"sigmas": [[1.0, 0.5]]},
        {"sigmas": [1.0, float("nan")]},
        {"sigmas": [1.0, 0.5], "num_inference_steps": 3},
        {"sigmas": [1.0, 0.5], "denoising_strength": 0.5},
        {"num_inference_steps": 4, "mu": 1.0, "shift_sigmas": False},
        {"num_inference_steps": 4, "mu": float("inf")},
    ],
)
def test_invalid_set_timesteps(kwargs: dict[str, Any]) -> None:
    kwargs.setdefault("image_seq_len", 1024)
    with pytest.raises(PipelineInputError):
        FlowMatchScheduler("flux2").set_timesteps(**kwargs)


def test_invalid_other_calls() -> None:
    ours = FlowMatchScheduler("flux1")
    x = torch.zeros(2, 4, 3)
    with pytest.raises(PipelineInputError, match="set_timesteps"):
        ours.step(x, 0, x)
    ours.set_timesteps(4, image_seq_len=256)
    for bad_index in (-1, 4, 1.0):
        with pytest.raises(PipelineInputError):
            ours.step(x, bad_index, x)  # type: ignore[arg-type]
    with pytest.raises(PipelineInputError):
        ours.step(torch.zeros(2, 4, 1), 0, x)
    with pytest.raises(PipelineInputError):
        ours.add_noise(x, x, torch.ones(3))
    with pytest.raises(PipelineInputError):
        ours.add_noise(x, torch.zeros(2, 4), 0.5)
    with pytest.raises(PipelineInputError):
        ours.velocity_towards(x, x, 0.0)
    gen = torch.Generator().manual_seed(0)
    for kw in ({"batch_size": 0}, {"batch_size": 2, "timestep_sampling": "cosine"},
               {"batch_size": 2, "min_boundary": 0.6, "max_boundary": 0.5},
               {"batch_size": 2, "max_boundary": 1.5}, {"batch_size": 2, "logit_std": 0.0}):
        with pytest.raises(PipelineInputError):
            ours.sample_training_sigmas(generator=gen, **kw)
    with pytest.raises(PipelineInputError):
        ours.training_weight(torch.ones(2), weighting="snr")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [{"shift_mode": "sd3"}, {"shift": 0.0}, {"shift": float("nan")}, {"base_image_seq_len": 4096},
     {"num_train_timesteps": 0}, {"sigma_min": 1.0}, {"sigma_min": 0.0}],
)
def test_invalid_config(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        FlowMatchScheduler(**kwargs)


def test_for_family_and_repr() -> None:
    with pytest.raises(ConfigError):
        FlowMatchScheduler.for_family("sd3")  # type: ignore[arg-type]
    ours = FlowMatchScheduler.for_family("flux1", shift=2.0)
    assert ours.shift_mode == "flux1" and ours.shift == 2.0
    assert repr(ours).startswith("FlowMatchScheduler(shift_mode='flux1', shift=2.0")
    ours.set_timesteps(4, image_seq_len=4096)
    assert repr(ours).endswith("[4 steps, mu=1.15]")
