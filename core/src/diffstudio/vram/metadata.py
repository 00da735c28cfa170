"""The memory metadata a model family declares, and how the layer-wise policy reads it.

A family declares three class (or instance) attributes on each model it builds:

``repeated_blocks``
    Attribute paths of the ``nn.ModuleList`` s of identical blocks, in execution order
    (``("double_blocks", "single_blocks")``). Every block is one *streaming unit*: its weights move together,
    and the next blocks are prefetched while one computes.
``memory_leaves``
    The layer types whose weights are read **only inside their own ``forward``**: module classes
    (``nn.Linear``) or fnmatch patterns over class names in the MRO (``"*RMSNorm"``, for classes the family
    does not own, e.g. transformers' ``Qwen3RMSNorm``). Their tensors are offloaded, streamed and cast per
    call. Tensors outside any leaf (BatchNorm statistics read by a helper, RoPE tables) are *pinned*: they
    follow the model to the computation device as a whole at onload. A model that declares no leaves is moved
    as one piece (every tensor pinned).
``keep_in_high_precision``
    fnmatch patterns over state-dict names (``"*norm*"``, ``"time_in.*"``) whose tensors are never stored
    below the computation dtype (no fp8 for them), whatever the offload/onload/preparing dtypes say.

Nothing here imports torch at import time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import nn

#: A leaf declaration: a module class, or an fnmatch pattern over the class names in a module's MRO.
LeafSpec = type | str


@runtime_checkable
class MemoryMetadata(Protocol):
    """What a model declares for memory policies (class attributes are enough)."""

    repeated_blocks: Sequence[str]
    memory_leaves: Sequence[LeafSpec]
    keep_in_high_precision: Sequence[str]


@dataclass(frozen=True)
class ModelLayout:
    """A model's memory metadata, read once with defaults filled in.

    Attributes:
        repeated_blocks: Paths of the block lists, in execution order.
        leaves: Leaf declarations (empty: the model moves as one piece).
        keep_in_high_precision: Name patterns of tensors kept in the computation dtype.
    """

    repeated_blocks: tuple[str, ...] = ()
    leaves: tuple[LeafSpec, ...] = ()
    keep_in_high_precision: tuple[str, ...] = ()

    @classmethod
    def of(cls, model: Any) -> ModelLayout:
        """Read the declarations of ``model`` (missing ones are empty).

        Raises:
            TypeError: A declaration has the wrong type (the message names it).
        """

        def read(name: str) -> tuple[Any, ...]:
            value = getattr(model, name, ())
            if isinstance(value, (str, type)) or not isinstance(value, Sequence):
                raise TypeError(f"{type(model).__name__}.{name} must be a tuple (of strings or classes), got {value!r}")
            return tuple(value)

        return cls(read("repeated_blocks"), read("memory_leaves"), read("keep_in_high_precision"))

    def is_leaf(self, module: nn.Module) -> bool:
        """True when ``module`` matches a leaf declaration (by class or class-name pattern)."""
        names = [klass.__name__ for klass in type(module).__mro__]
        for spec in self.leaves:
            if isinstance(spec, type):
                if isinstance(module, spec):
                    return True
            elif any(fnmatchcase(name, spec) for name in names):
                return True
        return False

    def high_precision(self, name: str) -> bool:
        """True when the state-dict name ``name`` matches ``keep_in_high_precision``."""
        return any(fnmatchcase(name, pattern) for pattern in self.keep_in_high_precision)

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """``(qualified name, block)`` for every repeated block, in declared order.

        Raises:
            TypeError: A declared path is not a ``ModuleList`` (or other iterable of modules) of ``model``.
        """
        found: list[tuple[str, nn.Module]] = []
        for path in self.repeated_blocks:
            owner: Any = model
            for part in path.split("."):
                owner = getattr(owner, part, None)
            if owner is None:
                continue  # optional block lists (a variant without them) are allowed
            try:
                children = list(owner.named_children())
            except AttributeError:
                what = f"{type(model).__name__}.repeated_blocks names {path!r}"
                raise TypeError(f"{what}, which is not a module list") from None
            found.extend((f"{path}.{child}", block) for child, block in children)
        return found

    def leaves_of(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """Outermost leaf modules that hold tensors, as ``(qualified name, module)`` in registration order.

        A module registered under several names (T5's ``shared`` is also ``encoder.embed_tokens``) is one leaf,
        under its first name.
        """
        if not self.leaves:
            return
        yield from _outermost(model, "", self, set())


def _outermost(module: nn.Module, prefix: str, layout: ModelLayout, seen: set[int]) -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_children():
        if id(child) in seen:
            continue
        seen.add(id(child))
        qualified = f"{prefix}{name}"
        if layout.is_leaf(child):
            if any(True for _ in child.parameters()) or any(True for _ in child.buffers()):
                yield qualified, child
        else:
            yield from _outermost(child, qualified + ".", layout, seen)
