"""Optimisation options: the learning-rate schedule per step, and the logit-normal timestep options."""

from __future__ import annotations

import math

import pytest
from diffstudio.train import TrainConfigError
from diffstudio.train.config import TrainConfig
from diffstudio.train.loop import lr_factor


def _config(**options: object) -> TrainConfig:
    return TrainConfig(model_paths=["dit.safetensors"], trainable_models=["dit"], **options)  # type: ignore[arg-type]


def test_constant_is_one_after_a_linear_warmup():
    cfg = _config(lr_warmup_steps=3)
    assert [lr_factor(cfg, step) for step in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


@pytest.mark.parametrize(("name", "middle"), [("cosine", 0.5), ("linear", 0.5)])
def test_decays_reach_zero_at_max_steps(name, middle):
    cfg = _config(lr_scheduler=name, max_steps=101)
    assert lr_factor(cfg, 0) == pytest.approx(1.0)
    assert lr_factor(cfg, 50) == pytest.approx(middle, abs=0.02)
    assert lr_factor(cfg, 101) == pytest.approx(0.0, abs=1e-12)
    values = [lr_factor(cfg, step) for step in range(102)]
    assert all(a >= b for a, b in zip(values, values[1:])), "a decay never rises"


def test_cosine_after_warmup_starts_at_the_full_rate():
    cfg = _config(lr_scheduler="cosine", lr_warmup_steps=10, max_steps=110)
    assert lr_factor(cfg, 9) == pytest.approx(10 / 11)
    assert lr_factor(cfg, 10) == pytest.approx(1.0)
    assert lr_factor(cfg, 60) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_a_decay_without_max_steps_is_an_error_naming_both_flags():
    with pytest.raises(TrainConfigError, match="--lr_scheduler cosine.*--max_steps"):
        _config(lr_scheduler="cosine")
    with pytest.raises(TrainConfigError, match="--lr_scheduler 'step'"):
        _config(lr_scheduler="step", max_steps=3)
    with pytest.raises(TrainConfigError, match="--lr_warmup_steps"):
        _config(lr_warmup_steps=-1)


def test_logit_normal_options_parse_and_are_checked():
    from diffstudio.train.config import config_from_args

    argv = ["--dataset_base_path", "d", "--dataset_metadata_path", "d/m.csv", "--model_paths", '["dit.safetensors"]']
    argv += ["--trainable_models", "dit", "--timestep_sampling", "logit_normal", "--logit_mean", "-1.0"]
    cfg = config_from_args([*argv, "--logit_std", "0.8"])
    assert (cfg.logit_mean, cfg.logit_std, cfg.mode_scale) == (-1.0, 0.8, 1.29)
    with pytest.raises(TrainConfigError, match="--logit_std"):
        _config(logit_std=0.0)
