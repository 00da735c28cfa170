"""Family-independent LoRA primitives: the canonical form and the side path.

Every family converts the LoRA layouts people publish into one *canonical* form, a mapping from the module path
of one of its :class:`~diffstudio.nn.DeltaLinear` layers (a state-dict prefix such as
``double_blocks.0.img_attn.qkv``) to :class:`LoraWeights`. Applying and removing LoRAs, training them and writing
them back out in a published layout all work on that form, so the trainer and the template media never need to
know a family's key names.

A LoRA on a layer ``y = W x`` adds ``scale * (alpha / rank) * up @ down @ x``, with ``down`` of shape
``(rank, in_features)`` and ``up`` of shape ``(out_features, rank)``; ``alpha=None`` means ``alpha = rank`` (a
factor of 1), which is how PEFT files without alphas behave.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffstudio.nn.delta import delta_linears

__all__ = [
    "CanonicalLora",
    "LoraDelta",
    "LoraWeights",
    "attach_lora",
    "collect_lora",
    "detach_lora",
    "lora_names",
    "merge_lora",
]


@dataclass
class LoraWeights:
    """One layer's LoRA pair.

    Attributes:
        down: ``A``, shape ``(rank, in_features)``.
        up: ``B``, shape ``(out_features, rank)``.
        alpha: The file's alpha; None means ``rank`` (factor 1).
    """

    down: Tensor
    up: Tensor
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.down.ndim != 2 or self.up.ndim != 2 or self.down.shape[0] != self.up.shape[1]:
            raise ValueError(
                f"LoRA down {tuple(self.down.shape)} and up {tuple(self.up.shape)} do not form a pair: "
                "expected down (rank, in_features) and up (out_features, rank)"
            )

    @property
    def rank(self) -> int:
        """The LoRA rank ``r``."""
        return int(self.down.shape[0])

    @property
    def factor(self) -> float:
        """``alpha / rank`` (1.0 when alpha is None)."""
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    def delta_weight(self) -> Tensor:
        """The dense update ``factor * up @ down``, shape ``(out_features, in_features)``, float32."""
        return self.factor * (self.up.float() @ self.down.float())


CanonicalLora = dict[str, LoraWeights]
"""Module path of a ``DeltaLinear`` -> its LoRA pair."""


class LoraDelta(nn.Module):
    """A LoRA side path for :meth:`DeltaLinear.add_delta`: ``x -> scale * factor * (x @ down.T) @ up.T``.

    The tensors are parameters (trainable when ``trainable``), moved to the input's device and dtype on the fly
    when they differ, so a delta follows its layer under any memory strategy.
    """

    def __init__(self, weights: LoraWeights, scale: float = 1.0, *, trainable: bool = False) -> None:
        super().__init__()
        self.down = nn.Parameter(weights.down.detach().clone(), requires_grad=trainable)
        self.up = nn.Parameter(weights.up.detach().clone(), requires_grad=trainable)
        self.alpha = weights.alpha
        self.scale = float(scale)

    @property
    def rank(self) -> int:
        """The LoRA rank."""
        return int(self.down.shape[0])

    def weights(self) -> LoraWeights:
        """The current pair (detached), e.g. to save a trained LoRA."""
        return LoraWeights(self.down.detach(), self.up.detach(), self.alpha)

    def forward(self, x: Tensor) -> Tensor:
        """``(..., in_features) -> (..., out_features)``."""
        down: Tensor = self.down
        up: Tensor = self.up
        if down.device != x.device or down.dtype != x.dtype:
            down, up = down.to(x), up.to(x)
        factor = 1.0 if self.alpha is None else float(self.alpha) / self.rank
        out: Tensor = (x @ down.T) @ up.T
        return out * (self.scale * factor)


def attach_lora(
    model: nn.Module,
    lora: Mapping[str, LoraWeights],
    name: str,
    scale: float = 1.0,
    *,
    trainable: bool = False,
) -> dict[str, LoraDelta]:
    """Add one LoRA as side paths named ``name`` on the model's ``DeltaLinear`` layers (never merged).

    Args:
        model: The model (e.g. a DiT) whose layers are :class:`DeltaLinear`.
        lora: Canonical LoRA; every key must name a ``DeltaLinear`` of ``model``.
        name: Side-path name (several LoRAs stack under different names).
        scale: Multiplier of the whole LoRA.
        trainable: Make the LoRA tensors trainable parameters.

    Returns:
        The side paths by module path (their parameters are what a trainer optimises).

    Raises:
        KeyError: a key names no ``DeltaLinear`` of the model (the message lists close layers).
        ValueError: shapes do not fit the layer, or ``name`` is already attached.
    """
    layers = dict(delta_linears(model))
    unknown = [key for key in lora if key not in layers]
    if unknown:
        raise KeyError(
            f"LoRA targets {len(unknown)} module(s) the model does not have, e.g. {unknown[:3]}; "
            f"LoRA-capable layers look like {sorted(layers)[:3]}"
        )
    deltas: dict[str, LoraDelta] = {}
    for key, weights in lora.items():
        layer = layers[key]
        if weights.down.shape[1] != layer.in_features or weights.up.shape[0] != layer.out_features:
            raise ValueError(
                f"LoRA for {key} maps {weights.down.shape[1]} -> {weights.up.shape[0]} features but the layer "
                f"is {layer.in_features} -> {layer.out_features}"
            )
        deltas[key] = LoraDelta(weights, scale, trainable=trainable).to(layer.weight.device)
    for key, delta in deltas.items():
        layers[key].add_delta(name, delta)
    return deltas


def detach_lora(model: nn.Module, name: str) -> int:
    """Remove the side paths named ``name`` from every layer; return how many were removed."""
    removed = 0
    for _, layer in delta_linears(model):
        if layer.remove_delta(name, missing_ok=True) is not None:
            removed += 1
    return removed


def lora_names(model: nn.Module) -> list[str]:
    """Names of the side paths attached anywhere in ``model``, sorted."""
    names: set[str] = set()
    for _, layer in delta_linears(model):
        names.update(layer.deltas)
    return sorted(names)


def collect_lora(model: nn.Module, name: str) -> CanonicalLora:
    """Read back the LoRA attached as ``name`` (e.g. after training) in canonical form."""
    found: CanonicalLora = {}
    for key, layer in delta_linears(model):
        delta = layer.deltas.get(name)
        if isinstance(delta, LoraDelta):
            found[key] = delta.weights()
    return found


def merge_lora(model: nn.Module, lora: Mapping[str, LoraWeights], scale: float = 1.0) -> None:
    """Fuse a LoRA into the base weights in place (``W += scale * factor * up @ down``); subtract with -scale."""
    layers = dict(delta_linears(model))
    with torch.no_grad():
        for key, weights in lora.items():
            layer = layers[key]
            layer.weight.add_((scale * weights.delta_weight()).to(layer.weight))
