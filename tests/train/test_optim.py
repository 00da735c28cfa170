"""The trainer's optimizer: fused AdamW where PyTorch has the kernel, and the step that skips accelerate's probe."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from diffstudio.train.optim import adamw, fusable, stepper


@pytest.fixture
def accelerator_factory():
    made: list[Accelerator] = []

    def make(**options: object) -> Accelerator:
        AcceleratorState._reset_state()
        GradientState._reset_state()
        accelerator = Accelerator(cpu=True, **options)
        made.append(accelerator)
        return accelerator

    yield make
    AcceleratorState._reset_state()
    GradientState._reset_state()


def test_cpu_float_parameters_get_the_fused_kernel() -> None:
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3, dtype=torch.bfloat16))]
    optimizer = adamw(params, lr=1e-3, weight_decay=0.01)
    assert optimizer.defaults["fused"] is True
    assert optimizer.defaults["weight_decay"] == 0.01


def test_integer_or_mixed_device_parameters_fall_back_to_the_default_implementation() -> None:
    assert not fusable([torch.zeros(2, dtype=torch.int64)])
    assert not fusable([torch.zeros(2), torch.zeros(2, device="meta")])
    assert not fusable([])
    optimizer = adamw([torch.nn.Parameter(torch.zeros(2, device="meta"))], lr=1e-3, weight_decay=0.0)
    assert not optimizer.defaults["fused"]


def test_fused_and_default_adamw_take_the_same_steps() -> None:
    torch.manual_seed(0)
    start = torch.randn(64, 32)
    grads = [torch.randn(64, 32) for _ in range(5)]
    results = []
    for make in (
        lambda p: adamw(p, lr=1e-2, weight_decay=0.1),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    ):
        param = torch.nn.Parameter(start.clone())
        optimizer = make([param])
        for grad in grads:
            param.grad = grad.clone()
            optimizer.step()
        results.append(param.detach())
    assert torch.allclose(results[0], results[1], atol=1e-6, rtol=0)


def test_stepper_updates_only_on_the_last_micro_step_of_an_accumulation(accelerator_factory) -> None:
    accelerator = accelerator_factory(gradient_accumulation_steps=2)
    model = torch.nn.Linear(3, 1)
    model, optimizer = accelerator.prepare(model, adamw(model.parameters(), lr=0.1, weight_decay=0.0))
    step = stepper(optimizer)
    assert step != optimizer.step  # the direct path: accelerate's wrapper has nothing to do on CPU in fp32
    before = model.weight.detach().clone()
    updates = []
    for _ in range(4):
        with accelerator.accumulate(model):
            accelerator.backward(model(torch.ones(2, 3)).sum())
            step()
            optimizer.zero_grad()
        updates.append(not torch.equal(model.weight.detach(), before))
        before = model.weight.detach().clone()
    assert updates == [False, True, False, True]


def test_stepper_keeps_accelerate_step_for_other_optimizers() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    assert stepper(optimizer) == optimizer.step
