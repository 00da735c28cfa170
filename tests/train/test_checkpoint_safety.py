"""Checkpoints are never unpickled, are validated as a whole, and fall back to the previous good one.

These tests train a toy objective (one Linear in ``trained``, a frozen one beside it) with the trainer's AdamW, an
EMA and accelerate's real (single-process) Accelerator, and checkpoint it with :mod:`diffstudio.train.checkpoints`.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
from pathlib import Path

import pytest
import torch
from diffstudio.errors import CheckpointError
from diffstudio.train.checkpoints import (
    TrainerState,
    TrainingParts,
    read_trainer_state,
    resume,
    save_checkpoint,
)
from diffstudio.train.ema import EmaWeights
from diffstudio.train.files import save_weights, write_json
from diffstudio.train.optim import adamw
from torch import nn

MARKER_NAME = "pwned"


class Payload:
    """Unpickling this writes a marker file (what an attacker's checkpoint would do, harmlessly)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return (Path.touch, (self.marker,))


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trained = nn.ModuleDict({"net": nn.Linear(3, 2)})
        self.frozen = nn.Linear(2, 2).requires_grad_(False)


def _accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(cpu=True)


def _run(ema_decay: float | None = 0.9, seed: int = 0) -> TrainingParts:
    torch.manual_seed(seed)
    toy = Toy()
    params = [p for p in toy.parameters() if p.requires_grad]
    ema = EmaWeights(toy, ema_decay) if ema_decay else None
    return TrainingParts(toy, adamw(params, lr=1e-2, weight_decay=0.01), ema)


def _step(parts: TrainingParts, step: int) -> None:
    x = torch.sin(torch.arange(6.0) + step).reshape(2, 3) + torch.rand(2, 3)
    loss = parts.module.frozen(parts.module.trained["net"](x)).square().mean()
    loss.backward()
    parts.optimizer.step()
    parts.optimizer.zero_grad(set_to_none=True)
    if parts.ema is not None:
        parts.ema.update()


def _train(output: Path, steps: int, accelerator, parts: TrainingParts | None = None) -> TrainingParts:
    parts = parts or _run()
    for step in range(1, steps + 1):
        _step(parts, step)
        save_checkpoint(accelerator, output, TrainerState(step, 0, step), parts)
    return parts


def _snapshot(parts: TrainingParts) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in parts.module.parameters()]
    out += [t.clone() for t in (parts.ema.shadow if parts.ema else [])]
    return out + [torch.get_rng_state()]


def _evil_pickles(folder: Path, marker: Path) -> list[str]:
    """Put a payload pickle in every file a resume could read: accelerate's names and our own."""
    names = [
        "custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl", "pytorch_model.bin", "scaler.pt",
        "sampler.bin", "scheduler.bin", "dl_state_dict.bin", "model.safetensors", "weights.safetensors",
        "optimizer.safetensors", "ema.safetensors", "rng-0.safetensors", "trainer_state.json",
    ]  # fmt: skip
    for i, name in enumerate(names):
        if i % 2:
            torch.save({"state": Payload(marker)}, folder / name)  # torch's zip format, as accelerate writes
        else:
            (folder / name).write_bytes(pickle.dumps(Payload(marker)))
    return names


def test_resume_with_ema_never_unpickles_a_tampered_checkpoint(tmp_path, caplog):
    """21.2: a checkpoint folder full of payload pickles runs nothing; resume falls back to the good one."""
    marker = tmp_path / MARKER_NAME
    accelerator = _accelerator()
    _train(tmp_path / "out", 2, accelerator)
    _evil_pickles(tmp_path / "out" / "checkpoints" / "step-2", marker)
    fresh = _run()
    with caplog.at_level(logging.WARNING, logger="diffstudio.train"):
        resumed = resume(tmp_path / "out", fresh)
    assert resumed is not None and resumed.state.step == 1
    assert "step-2 is unusable" in caplog.text
    assert not marker.exists()
    # a folder holding nothing but pickles (the older accelerate layout included) is a typed error
    only = tmp_path / "only" / "checkpoints" / "step-3"
    only.mkdir(parents=True)
    _evil_pickles(only, marker)
    (only / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match="pickle-based format"):
        resume(tmp_path / "only", _run())
    assert not marker.exists()


@pytest.mark.parametrize(
    "name",
    ["weights.safetensors", "optimizer.safetensors", "ema.safetensors", "rng-0.safetensors", "trainer_state.json"],
)
def test_each_checkpoint_part_holding_a_pickle_is_refused_without_unpickling(tmp_path, name):
    marker = tmp_path / MARKER_NAME
    _train(tmp_path, 1, _accelerator())
    folder = tmp_path / "checkpoints" / "step-1"
    torch.save({"state": Payload(marker)}, folder / name)
    with pytest.raises(CheckpointError, match="none of the 1 checkpoint"):
        resume(tmp_path, _run())
    assert not marker.exists()


def test_resumed_state_equals_the_saved_state(tmp_path):
    accelerator = _accelerator()
    parts = _train(tmp_path, 3, accelerator)
    saved = _snapshot(parts)
    saved_optimizer = parts.optimizer.state_dict()
    random.random(), torch.rand(3)  # move the generators on
    fresh = _run()  # frozen weights come from the model files: the same; the trained ones start over
    resumed = resume(tmp_path, fresh)
    assert resumed is not None
    assert resumed.apply(fresh) == TrainerState(3, 0, 3)
    for a, b in zip(saved, _snapshot(fresh), strict=True):
        assert torch.equal(a, b)
    state = fresh.optimizer.state_dict()
    assert state["param_groups"] == saved_optimizer["param_groups"]
    for index, entries in saved_optimizer["state"].items():
        for key, value in entries.items():
            assert torch.equal(state["state"][index][key], value)
    # the next step is the same step (the resumed generator included)
    generator = torch.get_rng_state()
    _step(fresh, 4)
    torch.set_rng_state(generator)
    _step(parts, 4)
    for a, b in zip(_snapshot(parts)[:-1], _snapshot(fresh)[:-1], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{}", "format must be"),
        ('{"format": "diffstudio-train-checkpoint/2"}', "step must be an integer"),
        ('{"format": "diffstudio-train-checkpoint/2", "step": 0, "epoch": 0, "update_in_epoch": 0, "processes": 1, '
         '"parts": ["weights", "optimizer"]}', "step is 0 but the folder is step-2"),
        ("[" * 100000, "not valid JSON"),
        ("", "not valid JSON"),
    ],
)  # fmt: skip
def test_empty_trainer_state_does_not_restart_at_step_0_on_trained_weights(tmp_path, caplog, content, message):
    """21.9: ``trainer_state.json`` of ``{}`` (or any broken one) is refused; the previous checkpoint is used."""
    _train(tmp_path, 2, _accelerator())
    (tmp_path / "checkpoints" / "step-2" / "trainer_state.json").write_text(content)
    with caplog.at_level(logging.WARNING, logger="diffstudio.train"):
        resumed = resume(tmp_path, _run())
    assert resumed is not None and resumed.state.step == 1
    assert message in caplog.text
    with pytest.raises(CheckpointError, match=message):
        read_trainer_state(tmp_path / "checkpoints" / "step-2", 2)


def test_corrupted_checkpoint_falls_back_to_the_previous_good_one_and_errors_when_none_is(tmp_path, caplog):
    """21.9: a truncated part is a typed error; resume uses the previous checkpoint; none good: CheckpointError."""
    _train(tmp_path, 3, _accelerator())
    root = tmp_path / "checkpoints"
    weights = root / "step-3" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    (root / "step-2" / "optimizer.safetensors").unlink()
    with caplog.at_level(logging.WARNING, logger="diffstudio.train"):
        resumed = resume(tmp_path, _run())
    assert resumed is not None and resumed.state.step == 1
    assert "step-3 is unusable" in caplog.text and "step-2 is unusable" in caplog.text
    rng = root / "step-1" / "rng-0.safetensors"
    rng.write_bytes(rng.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"none of the 3 checkpoint\(s\).*Move the folder away"):
        resume(tmp_path, _run())


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    _train(tmp_path, 1, _accelerator())
    other = _run()
    other.module.trained["net"] = nn.Linear(3, 4)
    with pytest.raises(CheckpointError, match="shape"):
        resume(tmp_path, TrainingParts(other.module, adamw(other.module.trained.parameters(), lr=1e-2,
                                                            weight_decay=0.0), other.ema))  # fmt: skip
    assert resume(tmp_path / "nothing", _run()) is None  # no checkpoint at all: a fresh start


def test_training_files_are_written_by_rename_with_the_umask_mode(tmp_path):
    """21.10 / 22.12: weights, LoRAs and state files replace the target by rename and get 0o666 & ~umask."""
    umask = os.umask(0o022)
    os.umask(umask)
    target = tmp_path / "lora.safetensors"
    save_weights(target, {"a": torch.zeros(2)})
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    with open(target, "rb") as old:
        save_weights(target, {"a": torch.ones(3)})  # a new file is renamed over the old one ...
        assert len(old.read()) < target.stat().st_size  # ... which the open handle still reads
    with pytest.raises(Exception):  # noqa: B017 - safetensors refuses non-tensors; the target must survive
        save_weights(target, {"a": "not a tensor"})  # type: ignore[dict-item]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]
    state = tmp_path / "trainer_state.json"
    write_json(state, {"step": 1})
    with open(state, encoding="utf-8") as old:
        write_json(state, {"step": 2})
        assert json.loads(old.read()) == {"step": 1}
    assert state.stat().st_mode & 0o777 == 0o666 & ~umask
    # a checkpoint's files too; rewriting a step replaces the folder as a whole
    _train(tmp_path / "run", 1, _accelerator())
    folder = tmp_path / "run" / "checkpoints" / "step-1"
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o666 & ~umask}
    inode = folder.stat().st_ino
    save_checkpoint(_accelerator(), tmp_path / "run", TrainerState(1, 0, 1), _run())
    assert folder.stat().st_ino != inode
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-1"]


def test_the_payload_runs_when_unpickled(tmp_path):
    """The tests above could fail: unpickling the payload does write the marker."""
    pickle.loads(pickle.dumps(Payload(tmp_path / MARKER_NAME)))
    assert (tmp_path / MARKER_NAME).exists()
