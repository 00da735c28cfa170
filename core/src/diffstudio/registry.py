"""Typed registries filled by the ``register_*`` hooks.

A registry maps a unique name to one object and remembers which plugin registered it, so a duplicate name is
reported with both owners.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from diffstudio.errors import DiffstudioError, DuplicateRegistrationError

T = TypeVar("T")


class UnknownNameError(DiffstudioError, KeyError):
    """A registry was asked for a name nobody registered."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Name → object, with the owning plugin recorded for error messages.

    Args:
        kind: What the registry holds, for messages (``"pipeline"``, ``"scheduler"``).
        key: Extracts the unique name from an object.
    """

    def __init__(self, kind: str, key: Callable[[T], str]) -> None:
        self.kind = kind
        self._key = key
        self._items: dict[str, T] = {}
        self._owners: dict[str, str] = {}

    def register(self, item: T, owner: str) -> None:
        """Add ``item``; raise ``DuplicateRegistrationError`` if its name is taken."""
        name = self._key(item)
        if name in self._items:
            raise DuplicateRegistrationError(
                f"The {self.kind} {name!r} is registered twice: by plugin {self._owners[name]!r} and by plugin "
                f"{owner!r}. Uninstall or block one of them (DIFFSTUDIO_DISABLED_PLUGINS={owner})."
            )
        self._items[name] = item
        self._owners[name] = owner

    def register_all(self, items: list[T], owner: str) -> None:
        """Add every item of one plugin, or none of them if one name is taken (or repeated among ``items``)."""
        names = [self._key(item) for item in items]
        for index, name in enumerate(names):
            if name in self._items or name in names[:index]:
                first = self._owners.get(name, owner)
                raise DuplicateRegistrationError(
                    f"The {self.kind} {name!r} is registered twice: by plugin {first!r} and by plugin "
                    f"{owner!r}. Uninstall or block one of them (DIFFSTUDIO_DISABLED_PLUGINS={owner})."
                )
        for item in items:
            self.register(item, owner)

    def get(self, name: str) -> T:
        """Return the object registered as ``name``."""
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise UnknownNameError(
                f"No {self.kind} named {name!r} is registered (known: {known}). Is its plugin installed? "
                f"See `diffstudio plugins`."
            ) from None

    def owner(self, name: str) -> str:
        """Return the plugin that registered ``name``."""
        return self._owners[name]

    def names(self) -> list[str]:
        """Return the registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[T]:
        return iter(self._items[name] for name in sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)
