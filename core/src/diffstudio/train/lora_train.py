"""Trainable LoRA side paths for the trainer, and LoRA files in the published layouts.

``--lora_base_model dit --lora_target_modules a,b --lora_rank r`` adds a trainable
:class:`~diffstudio.lora.LoraDelta` to every ``DeltaLinear`` of that component whose module path matches a
target pattern (a name equals the pattern, ends with ``.pattern``, or matches it as an ``fnmatch`` glob). The
down matrix starts as a seeded Kaiming-uniform draw and the up matrix as zeros, so training starts at the base
model. Saving goes through the family's registered :class:`~diffstudio.types.LoraFormat` writers
(``from_canonical``), so the trainer never knows a family's key names.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence

import torch
from torch import nn

from diffstudio.lora import LoraDelta, LoraWeights, attach_lora
from diffstudio.nn.delta import delta_linears
from diffstudio.train.config import TrainConfigError

TRAINED_LORA = "trained"
"""Side-path name of the LoRA being trained."""


def matches(path: str, patterns: Sequence[str]) -> bool:
    """True when the module ``path`` matches one of ``patterns`` (exact, ``.suffix`` or glob)."""
    for pattern in patterns:
        if path == pattern or path.endswith("." + pattern) or fnmatch.fnmatchcase(path, pattern):
            return True
    return False


def add_trainable_lora(
    model: nn.Module,
    patterns: Sequence[str],
    rank: int,
    alpha: float | None,
    *,
    seed: int,
    component: str,
) -> dict[str, LoraDelta]:
    """Attach a zero-initialised trainable LoRA to the matching ``DeltaLinear`` layers of ``model``.

    Args:
        model: The component (its Linear layers must be ``DeltaLinear``).
        patterns: Module-name patterns; empty means every ``DeltaLinear``.
        rank: LoRA rank.
        alpha: LoRA alpha (None: equal to the rank).
        seed: Seed of the down-matrix initialisation.
        component: Component name, for messages.

    Returns:
        The side paths by module path.

    Raises:
        TrainConfigError: no layer matches (the message lists layer names to choose from).
    """
    layers = [(path, layer) for path, layer in delta_linears(model) if not patterns or matches(path, patterns)]
    if not layers:
        names = sorted({path.rsplit(".", 1)[-1] for path, _ in delta_linears(model)})
        raise TrainConfigError(
            f"--lora_target_modules {','.join(patterns)} matches no Linear layer of {component!r}. "
            f"Layer names there: {', '.join(names[:40])}"
        )
    generator = torch.Generator().manual_seed(seed)
    lora: dict[str, LoraWeights] = {}
    for path, layer in layers:
        down = torch.empty(rank, layer.in_features)
        bound = 1.0 / math.sqrt(layer.in_features)
        down.uniform_(-bound, bound, generator=generator)
        up = torch.zeros(layer.out_features, rank)
        lora[path] = LoraWeights(down.to(layer.weight.dtype), up.to(layer.weight.dtype), alpha)
    return attach_lora(model, lora, TRAINED_LORA, trainable=True)


def lora_module(deltas: dict[str, LoraDelta]) -> nn.ModuleDict:
    """The side paths as one module (for the optimizer, DDP and checkpoints); keys use ``/`` for dots."""
    return nn.ModuleDict({path.replace(".", "/"): delta for path, delta in deltas.items()})
