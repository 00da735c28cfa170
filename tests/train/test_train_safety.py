"""``diffstudio train`` end to end on the tiny model: tampered checkpoints, when checkpoints are written, flags."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffstudio.errors import CheckpointError
from diffstudio.train import train
from diffstudio.train.config import config_from_args
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

ACCELERATE_FILES = ("custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl", "pytorch_model.bin",
                    "scaler.pt", "sampler.bin", "model.safetensors")  # fmt: skip
OWN_FILES = ("weights.safetensors", "optimizer.safetensors", "ema.safetensors", "rng-0.safetensors",
             "trainer_state.json")  # fmt: skip


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return (Path.touch, (self.marker,))


def test_train_resume_with_ema_decay_runs_no_pickle_from_the_checkpoint_folder(tiny_model, tmp_path, caplog):
    """21.2 through the trainer: every file of the newest checkpoint holds a payload; the run resumes from the
    previous checkpoint, runs nothing, and ends bit-identical to a run never stopped."""
    marker = tmp_path / "pwned"
    options = {"checkpoint_steps": 1, "ema_decay": 0.9, "max_steps": 3}
    train(**tiny_model.options(tmp_path / "run", **options))
    root, reference = tmp_path / "run" / "checkpoints", load_file(tmp_path / "run" / "step-3.safetensors")
    for name in (*ACCELERATE_FILES, *OWN_FILES):
        torch.save({"state": Payload(marker)}, root / "step-3" / name)
    (root / "step-2" / "trainer_state.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="diffstudio.train"):
        resumed = train(**tiny_model.options(tmp_path / "run", resume=True, **options))
    assert not marker.exists()
    assert "step-3 is unusable" in caplog.text and "step-2 is unusable" in caplog.text
    assert resumed.steps == 3 and len(resumed.losses) == 2  # from step 1
    again = load_file(tmp_path / "run" / "step-3.safetensors")
    assert all(torch.equal(again[k], reference[k]) for k in reference)
    for folder in (tmp_path / "run" / "checkpoints").iterdir():  # every checkpoint now tampered: a typed error
        for name in OWN_FILES:
            (folder / name).write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError, match="none of the 3 checkpoint"):
        train(**tiny_model.options(tmp_path / "run", resume=True, **{**options, "max_steps": 4}))
    assert not marker.exists()


def test_training_writes_no_checkpoints_without_checkpoint_steps(tiny_model, tmp_path, caplog):
    """22.12: no ``checkpoints/step-N`` unless asked (--checkpoint_steps, or --resume: epoch ends); LoRA files get
    the umask's mode, not 0600."""
    umask = os.umask(0o022)
    os.umask(umask)
    lora = {"trainable_models": [], "lora_base_model": "dit", "lora_target_modules": ["qkv"], "lora_rank": 4,
            "num_epochs": 1}  # fmt: skip
    train(**tiny_model.options(tmp_path / "plain", save_steps=2, **lora))
    assert not (tmp_path / "plain" / "checkpoints").exists()
    for name in ("epoch-0.safetensors", "step-2.safetensors", "train_log.json"):
        assert (tmp_path / "plain" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert not [p for p in (tmp_path / "plain").iterdir() if p.name.startswith(".")]  # no temporary file left
    with caplog.at_level(logging.WARNING, logger="diffstudio.train"):
        train(**tiny_model.options(tmp_path / "plain", resume=True, **lora))
    assert "no checkpoint" in caplog.text
    assert [p.name for p in (tmp_path / "plain" / "checkpoints").iterdir()] == ["step-4"]  # the epoch's end


def test_train_accepts_kebab_case_flags():
    """22.12: ``train`` takes ``--dataset-base-path`` as well as ``--dataset_base_path``; help shows the latter."""
    snake = ["--dataset_base_path", "data", "--dataset_metadata_path", "data/m.csv", "--model_paths", '["d.st"]',
             "--trainable_models", "dit", "--learning_rate", "1e-3", "--checkpoint_steps", "2",
             "--allow_outside_dataset", "--pipeline_args", '{"n": 3}', "--ema_decay", "0.9"]  # fmt: skip
    kebab = [a.replace("_", "-") if a.startswith("--") else a for a in snake]
    assert kebab != snake and config_from_args(kebab) == config_from_args(snake)
    mixed = [*snake[:2], "--dataset-metadata-path", *snake[3:]]
    assert config_from_args(mixed) == config_from_args(snake)
    entry = Path(sys.executable).with_name("diffstudio")
    shown = subprocess.run([str(entry), "train", "--help"], capture_output=True, text=True, timeout=60)
    assert (
        shown.returncode == 0
        and "--dataset_base_path" in shown.stdout
        and "--dataset-base-path DATASET" not in shown.stdout
    )
    assert "kebab-case" in shown.stdout


@pytest.mark.parametrize("name", ["checkpoint_steps", "save_steps", "max_steps", "validation_steps"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_step_intervals_below_one_are_refused(name, value):
    """``--checkpoint_steps 0`` wrote nothing and ``-1`` wrote a checkpoint every step, silently."""
    from diffstudio.train import TrainConfigError

    argv = ["--dataset_base_path", "d", "--dataset_metadata_path", "d/m.csv", "--model_paths", '["d.st"]',
            "--trainable_models", "dit", f"--{name}", value]  # fmt: skip
    with pytest.raises(TrainConfigError, match=f"--{name} must be an integer >= 1"):
        config_from_args(argv)
