"""``DeltaLinear``: an ``nn.Linear`` with named additive side paths.

A side path ("delta") is any callable ``fn(x) -> (..., out_features)``; the layer returns
``x @ W.T + b + sum(fn(x) for fn in deltas)``. LoRA is applied this way without merging weights, several
LoRAs stack by name, and removing one restores the base layer exactly. Deltas are plain attributes, never
submodules: the state dict keeps exactly the keys of ``nn.Linear`` (``weight``, ``bias``), and a delta that
owns weights moves them itself (its owner, e.g. an adapter plugin, is responsible for device and dtype).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from diffstudio.nn.linear import linear

DeltaFn = Callable[[Tensor], Tensor]
"""A side path: maps the layer input ``(..., in_features)`` to an output delta ``(..., out_features)``."""

DeltaCombiner = Callable[[Tensor, list[Tensor]], Tensor]
"""``combiner(base_out, [delta_i(x), ...]) -> out``: all ``(..., out_features)`` (LoRA-Fusion's gate)."""


class DeltaLinear(nn.Linear):
    """``nn.Linear`` computing ``y = W x + b + sum_i delta_i(x)``.

    With no deltas the forward is a single :func:`~diffstudio.nn.linear.linear` (``F.linear``, or oneDNN's
    kernel on CPU when no gradient is needed). Shapes: input ``(..., in_features)``, output
    ``(..., out_features)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._deltas: dict[str, DeltaFn] = {}
        self.__dict__["_combiner"] = None  # a plain attribute, never a submodule (see set_combiner)

    @property
    def deltas(self) -> dict[str, DeltaFn]:
        """A copy of the registered side paths, by name, in call order."""
        return dict(self._deltas)

    def add_delta(self, name: str, fn: DeltaFn) -> None:
        """Register a side path under ``name``.

        Raises:
            ValueError: ``name`` is already registered on this layer (remove it first).
        """
        if name in self._deltas:
            raise ValueError(f"delta {name!r} is already registered on this layer; remove_delta({name!r}) first")
        self._deltas[name] = fn

    def remove_delta(self, name: str, *, missing_ok: bool = False) -> DeltaFn | None:
        """Unregister the side path ``name`` and return it (None if absent and ``missing_ok``).

        Raises:
            KeyError: ``name`` is not registered and ``missing_ok`` is False.
        """
        if name not in self._deltas:
            if missing_ok:
                return None
            raise KeyError(f"no delta named {name!r} on this layer (registered: {sorted(self._deltas)})")
        return self._deltas.pop(name)

    def clear_deltas(self) -> None:
        """Remove every side path."""
        self._deltas.clear()

    @property
    def combiner(self) -> DeltaCombiner | None:
        """The combiner of the side paths' outputs, or None (they are summed)."""
        combiner: DeltaCombiner | None = self.__dict__.get("_combiner")
        return combiner

    def set_combiner(self, combiner: DeltaCombiner | None) -> None:
        """Combine the base output with the side paths' outputs by ``combiner`` instead of summing them.

        With a combiner and at least one side path the layer returns ``combiner(W x + b, [delta_i(x), ...])``;
        without side paths it still returns ``W x + b``. The combiner is kept as a plain attribute (never a
        submodule, so the state dict is unchanged, even when it is an ``nn.Module``); None restores the sum.
        """
        self.__dict__["_combiner"] = combiner

    def forward(self, input: Tensor) -> Tensor:
        """Apply the base projection plus every delta; ``(..., in) -> (..., out)``."""
        out = linear(input, self.weight, self.bias)
        combiner: DeltaCombiner | None = self.__dict__.get("_combiner")
        if combiner is not None and self._deltas:
            return combiner(out, [fn(input) for fn in self._deltas.values()])
        for fn in self._deltas.values():
            out = out + fn(input)
        return out

    def extra_repr(self) -> str:
        """Describe the layer, listing delta names."""
        base = super().extra_repr()
        return f"{base}, deltas={list(self._deltas)}" if self._deltas else base


def delta_linears(module: nn.Module) -> Iterator[tuple[str, DeltaLinear]]:
    """Yield ``(qualified_name, layer)`` for every :class:`DeltaLinear` inside ``module``.

    Names are state-dict prefixes (``double_blocks.0.img_attn.qkv``), so LoRA keys map onto them directly.
    """
    for name, sub in module.named_modules():
        if isinstance(sub, DeltaLinear):
            yield name, sub


def to_delta_linears(module: nn.Module) -> int:
    """Replace every plain ``nn.Linear`` below ``module`` by a :class:`DeltaLinear` sharing its parameters.

    Only exact ``nn.Linear`` instances are replaced (subclasses such as quantised layers are left alone). The
    state dict is unchanged. Useful for third-party modules (e.g. a text encoder) that should accept deltas.

    Returns:
        The number of layers replaced.
    """
    count = 0
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            new = DeltaLinear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
            new.weight = child.weight
            new.bias = child.bias
            new.train(child.training)
            setattr(parent, child_name, new)
            count += 1
    return count


DeltaMap = Mapping[str, DeltaFn]
"""Side paths for one call, keyed by the module path of a :class:`DeltaLinear` (``double_blocks.0.img_attn.qkv``)."""


@contextmanager
def scoped_deltas(module: nn.Module, deltas: DeltaMap | None, name: str = "scoped") -> Iterator[None]:
    """Attach side paths for the duration of a ``with`` block, then remove them (also on errors).

    This is how per-call (per CFG branch) LoRA tensors enter a model without being merged: the pipeline wraps
    one denoiser call in it. Nothing is cloned, so gradients flow from the output into whatever the side paths
    close over (e.g. LoRA tensors a template produced).

    Args:
        module: The model whose layers are :class:`DeltaLinear`.
        deltas: ``{module path: fn}``; None or empty attaches nothing.
        name: The side-path name used on every layer (must not already be attached there).

    Raises:
        KeyError: A path names no ``DeltaLinear`` of ``module`` (the message shows valid paths).
    """
    if not deltas:
        yield
        return
    layers = dict(delta_linears(module))
    unknown = sorted(set(deltas) - set(layers))
    if unknown:
        raise KeyError(
            f"side paths target {len(unknown)} module(s) the model does not have, e.g. {unknown[:3]}; "
            f"DeltaLinear paths look like {sorted(layers)[:3]}"
        )
    attached: list[DeltaLinear] = []
    try:
        for path, fn in deltas.items():
            layers[path].add_delta(name, fn)
            attached.append(layers[path])
        yield
    finally:
        for layer in attached:
            layer.remove_delta(name, missing_ok=True)
