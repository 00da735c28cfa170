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

PRESET_LORA = "preset"
"""Side-path name of the frozen ``--preset_lora_path`` LoRA (differential LoRA training)."""


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


def compact(weights: LoraWeights) -> LoraWeights:
    """Undo a split-and-fuse round trip: ``k`` identical stacked downs with block-diagonal ups become one pair.

    Layouts that store a fused layer (BFL ``qkv``) as separate projections (diffusers ``to_q/to_k/to_v``) copy
    its down matrix to each part; reading them back stacks the copies along the rank. The delta is unchanged,
    the rank is the original one again.
    """
    down, up = weights.down, weights.up
    rank = down.shape[0]
    for parts in range(rank, 1, -1):
        if rank % parts:
            continue
        size = rank // parts
        blocks = down.reshape(parts, size, down.shape[1])
        if all(torch.equal(blocks[0], blocks[i]) for i in range(1, parts)):
            folded = up.reshape(up.shape[0], parts, size).sum(dim=1)
            return LoraWeights(blocks[0].clone(), folded, weights.factor * size)
    return weights


def continue_from(
    model: nn.Module, deltas: dict[str, LoraDelta], saved: dict[str, LoraWeights]
) -> dict[str, LoraDelta]:
    """Start the trained LoRA from a saved one (``--lora_checkpoint``): same function, any layout it was saved in.

    Each saved layer's pair is compacted (see :func:`compact`) and rescaled to the trained delta's
    ``alpha / rank``; a layer whose saved rank still differs gets a trainable delta of the saved rank.

    Raises:
        TrainConfigError: the checkpoint holds layers the trained LoRA does not target.
    """
    unknown = sorted(set(saved) - set(deltas))
    if unknown:
        raise TrainConfigError(
            f"--lora_checkpoint holds layers that --lora_target_modules does not select, e.g. {unknown[:3]}"
        )
    out = dict(deltas)
    replaced: dict[str, LoraWeights] = {}
    with torch.no_grad():
        for path, weights in saved.items():
            weights = compact(weights)
            delta = deltas[path]
            factor = 1.0 if delta.alpha is None else float(delta.alpha) / delta.rank
            if weights.down.shape == delta.down.shape:
                delta.down.copy_(weights.down)
                delta.up.copy_(weights.up * (weights.factor / factor))
            else:
                replaced[path] = weights
    if replaced:
        from diffstudio.nn.delta import delta_linears

        layers = dict(delta_linears(model))
        for path in replaced:
            layers[path].remove_delta(TRAINED_LORA)
        out.update(attach_lora(model, replaced, TRAINED_LORA, trainable=True))
    return out
