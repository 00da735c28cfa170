"""Resumable checkpoints: written atomically, validated as a whole before a resume, never unpickled.

A checkpoint is a folder ``<output_path>/checkpoints/step-<N>/`` holding the training state in the project's
own format (see :mod:`diffstudio.train.state_files`: ``weights``, ``optimizer``, ``ema`` and one ``rng-<i>``
per process, each a safetensors file with JSON facts) and ``trainer_state.json`` (format, step, epoch,
position in the epoch, process count, the parts present, the gradient scaler's numbers), written last. The
folder is assembled under a temporary name and renamed, so a run killed mid-write leaves the previous
checkpoint intact.

No file of a checkpoint folder is ever unpickled: accelerate's ``save_state`` files (``optimizer.bin``,
``random_states_*.pkl``, ``custom_checkpoint_*.pkl``, ...) are neither written nor read, and a folder in
that older format is refused. ``--resume`` reads the checkpoint with the highest step and checks every part
(present, parseable, matching the run's modules, consistent with the step) before changing anything; when it
is unusable, it falls back to the next older checkpoint with a warning, and when none is usable it stops with
a :class:`~diffstudio.errors.CheckpointError` listing why.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from diffstudio.errors import CheckpointError
from diffstudio.train import state_files as sf
from diffstudio.train.files import read_json, save_weights, write_json
from diffstudio.train.state_files import PartValues, TrainingParts

__all__ = [
    "FORMAT",
    "TrainerState",
    "TrainingParts",
    "checkpoint_folders",
    "checkpoint_root",
    "read_checkpoint",
    "read_trainer_state",
    "resume",
    "save_checkpoint",
    "save_weights",
]

logger = logging.getLogger("diffstudio.train")

#: ``format`` of ``trainer_state.json``.
FORMAT = "diffstudio-train-checkpoint/2"
STATE_FILE = "trainer_state.json"
_FOLDER = re.compile(r"step-(0|[1-9][0-9]{0,17})")
#: accelerate's ``save_state`` files: their presence marks a checkpoint of the older, pickle-based format.
_ACCELERATE_FILES = ("optimizer.bin", "model.safetensors", "pytorch_model.bin", "random_states_0.pkl")


@dataclass
class TrainerState:
    """Where training stands.

    Attributes:
        step: Optimizer steps done.
        epoch: Current epoch.
        update_in_epoch: Optimizer steps done within the current epoch.
    """

    step: int = 0
    epoch: int = 0
    update_in_epoch: int = 0


@dataclass
class Resumed:
    """A checkpoint read and checked by :func:`read_checkpoint`, ready to :meth:`apply`."""

    folder: Path
    state: TrainerState
    values: PartValues

    def apply(self, parts: TrainingParts) -> TrainerState:
        """Restore the live objects; return the trainer state."""
        sf.apply(self.values, parts)
        return self.state


def checkpoint_root(output_path: str | Path) -> Path:
    """``<output_path>/checkpoints``."""
    return Path(output_path) / "checkpoints"


def checkpoint_folders(output_path: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``step-<N>`` folder, newest first (finished or not: see :func:`resume`)."""
    root = checkpoint_root(output_path)
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        match = _FOLDER.fullmatch(folder.name)
        if match and folder.is_dir():
            found.append((int(match.group(1)), folder))
    return sorted(found, reverse=True)


def read_trainer_state(folder: Path, step: int | None = None) -> tuple[TrainerState, dict[str, Any]]:
    """Parse and check ``folder/trainer_state.json``; return the state and the whole record.

    Args:
        folder: The checkpoint folder.
        step: The step its name says (``step-<N>``); the recorded step must equal it.

    Raises:
        CheckpointError: missing, not JSON, an older format, wrong types, or an inconsistent step.
    """
    path = folder / STATE_FILE
    if not path.is_file() and any((folder / name).exists() for name in _ACCELERATE_FILES):
        raise _legacy(folder)
    record = read_json(path)
    if not isinstance(record, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(record).__name__}")
    if record.get("format") != FORMAT:
        if "format" not in record and any((folder / name).exists() for name in _ACCELERATE_FILES):
            raise _legacy(folder)
        raise CheckpointError(f"{path}: format must be {FORMAT!r}, got {record.get('format')!r}")
    numbers = {name: sf.as_count(record.get(name), path, name) for name in ("step", "epoch", "update_in_epoch")}
    state = TrainerState(**numbers)
    if step is not None and state.step != step:
        raise CheckpointError(f"{path}: step is {state.step} but the folder is {folder.name}")
    if state.update_in_epoch > state.step:
        raise CheckpointError(f"{path}: update_in_epoch {state.update_in_epoch} is past step {state.step}")
    sf.as_count(record.get("processes"), path, "processes", low=1)
    parts = record.get("parts")
    if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts) or "weights" not in parts:
        raise CheckpointError(f"{path}: parts must be a list of part names including 'weights'")
    return state, record


def _legacy(folder: Path) -> CheckpointError:
    return CheckpointError(
        f"{folder} is a checkpoint in accelerate's pickle-based format (written by an older diffstudio); it is not "
        "loaded, because unpickling a checkpoint folder can run code. Train again from the start (move the "
        "folder away) or resume with the diffstudio version that wrote it"
    )


def read_checkpoint(folder: Path, parts: TrainingParts, process_index: int = 0) -> Resumed:
    """Read every part of ``folder`` and check it against ``parts``; nothing is changed yet.

    Raises:
        CheckpointError: the first problem found (a missing or unreadable part, a mismatch, a wrong step).
    """
    match = _FOLDER.fullmatch(folder.name)
    state, record = read_trainer_state(folder, int(match.group(1)) if match else None)
    values = PartValues(
        weights=sf.read_weights(folder / sf.WEIGHTS, parts.module),
        optimizer=sf.read_optimizer(folder / sf.OPTIMIZER, parts.optimizer, state.step),
        scaler=sf.read_scaler(record.get("scaler"), folder / STATE_FILE),
    )
    if parts.ema is not None:
        if "ema" in record["parts"]:
            values.ema = sf.read_ema(folder / sf.EMA, parts.ema, state.step)
        else:
            logger.warning("%s holds no EMA; --ema_decay starts its average from the resumed weights", folder)
    processes = record["processes"]
    rng = [sf.read_rng(folder / sf.rng_name(i)) for i in range(processes)]  # all: every process decides alike
    if process_index < processes:
        values.rng = rng[process_index]
    else:
        logger.warning("%s was written by %d processes; process %d keeps its random state", folder, processes,
                       process_index)  # fmt: skip
    return Resumed(folder, state, values)


def resume(output_path: str | Path, parts: TrainingParts, process_index: int = 0) -> Resumed | None:
    """The newest usable checkpoint under ``output_path`` (older ones when newer are unusable), or None.

    None means there is no ``step-<N>`` folder at all. Each unusable checkpoint is reported with a warning.

    Raises:
        CheckpointError: there are checkpoints, and none of them is usable.
    """
    folders = checkpoint_folders(output_path)
    problems: list[str] = []
    for _, folder in folders:
        try:
            resumed = read_checkpoint(folder, parts, process_index)
        except CheckpointError as exc:
            logger.warning("checkpoint %s is unusable (%s); trying the previous one", folder, exc)
            problems.append(f"{folder.name}: {exc}")
            continue
        if problems:
            logger.warning("resuming from %s, older than the unusable checkpoint(s) after it", folder)
        return resumed
    if folders:
        raise CheckpointError(
            f"--resume: none of the {len(folders)} checkpoint(s) in {checkpoint_root(output_path)} is usable: "
            + "; ".join(problems)
            + ". Move the folder away to train from the start"
        )
    return None


def save_checkpoint(
    accelerator: Any, output_path: str | Path, state: TrainerState, parts: TrainingParts
) -> Path | None:
    """Write a checkpoint for ``state`` (all processes call this; the main one renames it into place)."""
    root = checkpoint_root(output_path)
    final = root / f"step-{state.step}"
    temporary = root / f".step-{state.step}.partial"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    sf.write_part(temporary / sf.rng_name(accelerator.process_index), *sf.rng_record())
    if main:
        written = ["weights", "optimizer"]
        sf.write_part(temporary / sf.WEIGHTS, sf.trained_tensors(parts.module), {"step": state.step})
        sf.write_part(temporary / sf.OPTIMIZER, *sf.optimizer_record(parts.optimizer))
        if parts.ema is not None:
            sf.write_part(temporary / sf.EMA, *sf.ema_record(parts.ema))
            written.append("ema")
    accelerator.wait_for_everyone()
    if main:
        scaler = parts.scaler.state_dict() if parts.scaler is not None else None
        record = {"format": FORMAT, **asdict(state), "processes": int(accelerator.num_processes),
                  "parts": written, "scaler": scaler}  # fmt: skip
        write_json(temporary / STATE_FILE, record)  # last: a folder without it was never finished
        old = root / f".step-{state.step}.old"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(temporary, final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final if main else None
