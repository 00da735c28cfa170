"""Training on accelerate: ``diffstudio train`` and :func:`train`.

Family-agnostic: the trainer loads whichever family claims the models, prepares samples with that family's own
units (``call_inputs`` + ``prepare``) and calls its ``predict_velocity``; LoRAs are side paths on the family's
``DeltaLinear`` layers and are written through the family's registered LoRA formats.

The public names load on first access, so that building the command line (``diffstudio.train.config``)
imports neither torch nor PIL.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from diffstudio.train.config import TrainConfig, TrainConfigError, add_arguments, config_from_args
    from diffstudio.train.data import DatasetError, TrainingDataset
    from diffstudio.train.loop import Trainer, TrainResult, train

_LAZY = {
    "TrainConfig": "diffstudio.train.config",
    "TrainConfigError": "diffstudio.train.config",
    "add_arguments": "diffstudio.train.config",
    "config_from_args": "diffstudio.train.config",
    "DatasetError": "diffstudio.train.data",
    "TrainingDataset": "diffstudio.train.data",
    "Trainer": "diffstudio.train.loop",
    "TrainResult": "diffstudio.train.loop",
    "train": "diffstudio.train.loop",
}

__all__ = [
    "DatasetError",
    "TrainConfig",
    "TrainConfigError",
    "TrainResult",
    "Trainer",
    "TrainingDataset",
    "add_arguments",
    "config_from_args",
    "train",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'diffstudio.train' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
