"""Training on accelerate: ``diffstudio train`` and :func:`train` (see ``docs`` in the README's training part).

Family-agnostic: the trainer loads whichever family claims the models, prepares samples with that family's own
units (``call_inputs`` + ``prepare``) and calls its ``predict_velocity``; LoRAs are side paths on the family's
``DeltaLinear`` layers and are written through the family's registered LoRA formats.
"""

from __future__ import annotations

from diffstudio.train.config import TrainConfig, TrainConfigError, add_arguments, config_from_args
from diffstudio.train.data import DatasetError, TrainingDataset
from diffstudio.train.loop import Trainer, TrainResult, train

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
