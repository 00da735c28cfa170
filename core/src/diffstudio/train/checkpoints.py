"""Resumable checkpoints and trained-weight files, all written atomically.

A checkpoint is a folder ``<output_path>/checkpoints/step-<N>/`` holding accelerate's state (trainable
weights, optimizer, RNG states) plus ``trainer_state.json`` (epoch, step, position in the epoch). It is
written under a temporary name and renamed, so a run killed mid-write leaves the previous checkpoint intact.
``--resume`` picks the checkpoint with the highest step.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from diffstudio._io import atomic_write_text


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


def checkpoint_root(output_path: str | Path) -> Path:
    """``<output_path>/checkpoints``."""
    return Path(output_path) / "checkpoints"


def latest_checkpoint(output_path: str | Path) -> Path | None:
    """The finished checkpoint folder with the highest step, or None."""
    root = checkpoint_root(output_path)
    if not root.is_dir():
        return None
    found = []
    for folder in root.iterdir():
        if folder.name.startswith("step-") and (folder / "trainer_state.json").is_file():
            try:
                found.append((int(folder.name[5:]), folder))
            except ValueError:
                continue
    return max(found)[1] if found else None


def save_checkpoint(accelerator: Any, output_path: str | Path, state: TrainerState) -> Path | None:
    """Write a checkpoint for ``state`` (all processes call this; the main one renames it into place)."""
    root = checkpoint_root(output_path)
    final = root / f"step-{state.step}"
    temporary = root / f".step-{state.step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_text(temporary / "trainer_state.json", json.dumps(asdict(state)) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
    accelerator.wait_for_everyone()
    return final if accelerator.is_main_process else None


def load_checkpoint(accelerator: Any, folder: Path) -> TrainerState:
    """Restore accelerate's state from ``folder`` and return the trainer state saved with it."""
    accelerator.load_state(str(folder))
    data = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    return TrainerState(**data)


def save_weights(path: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Save a safetensors file atomically (temporary name in the same folder, fsync, rename)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    owned = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(owned, str(temporary), metadata=dict(metadata or {}))
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return path
