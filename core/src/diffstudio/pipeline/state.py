"""Per-call pipeline state: shared values plus one dict per CFG branch."""

from __future__ import annotations

from collections import ChainMap
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from diffstudio.pipeline.units import Branch

T = TypeVar("T")


class StashKey(Generic[T]):
    """A typed key for a unit's private per-call value in :attr:`PipelineState.stash`."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"StashKey({self.name!r})"


@dataclass
class PipelineState:
    """Everything one pipeline call computes.

    Attributes:
        shared: Call arguments and outputs of shared units (latents, timesteps, ...).
        positive: Outputs of per-branch units for the positive prompt (prompt embeddings, ...).
        negative: The same for the negative prompt; filled only when CFG is active.
        stash: Private per-call values keyed by :class:`StashKey`.
    """

    shared: dict[str, Any]
    positive: dict[str, Any] = field(default_factory=dict)
    negative: dict[str, Any] = field(default_factory=dict)
    stash: dict[StashKey[Any], Any] = field(default_factory=dict)

    def branch(self, branch: Branch) -> dict[str, Any]:
        """Return the dict that ``branch`` writes to."""
        if branch == "positive":
            return self.positive
        if branch == "negative":
            return self.negative
        return self.shared

    def view(self, branch: Branch) -> ChainMap[str, Any]:
        """Return the values visible on ``branch``: the branch's own outputs over the shared state.

        A branch view also answers ``branch`` (its name) under everything else: the DiT call hooks read it.
        """
        if branch == "shared":
            return ChainMap(self.shared)
        return ChainMap(self.branch(branch), self.shared, {"branch": branch})

    def get_stash(self, key: StashKey[T], default: T) -> T:
        """Return a stashed value, or ``default``."""
        value = self.stash.get(key, default)
        return value  # type: ignore[no-any-return]

    def set_stash(self, key: StashKey[T], value: T) -> None:
        """Store a private per-call value."""
        self.stash[key] = value
