"""--ema_decay: the average follows diffusers' EMAModel step for step and resumes from its state."""

from __future__ import annotations

import torch
from diffstudio.train.ema import EmaWeights
from diffusers.training_utils import EMAModel


def _walk(model: torch.nn.Module, step: int) -> None:
    with torch.no_grad():
        for i, param in enumerate(model.parameters()):
            param.add_(torch.sin(torch.arange(param.numel(), dtype=torch.float32) + step + i).view_as(param))


def test_the_average_equals_diffusers_ema_model() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    ours = EmaWeights(model, 0.99)
    theirs = EMAModel(model.parameters(), decay=0.99)
    for step in range(40):
        _walk(model, step)
        ours.update()
        theirs.step(model.parameters())
        for mine, reference in zip(ours.shadow, theirs.shadow_params, strict=True):
            assert torch.allclose(mine, reference, atol=1e-6, rtol=0), step
    assert ours.current_decay() == 41 / 50  # (1 + n) / (10 + n) until it reaches the decay


def test_the_first_update_starts_from_the_trained_values_and_a_resume_continues_the_schedule() -> None:
    model = torch.nn.Linear(2, 2)
    ema = EmaWeights(model, 0.999)
    _walk(model, 0)
    ema.update()
    assert all(torch.equal(s, p.detach()) for s, p in zip(ema.shadow, model.parameters(), strict=True))
    resumed = EmaWeights(model, 0.999)
    resumed.load_state_dict(ema.state_dict())
    assert resumed.updates == 1 and resumed.current_decay() == 2 / 11
    old = {"decay": 0.999, "shadow": [s.clone() for s in ema.shadow]}  # a checkpoint from before the warm-up
    resumed.load_state_dict(old)
    assert resumed.current_decay() == 0.999
