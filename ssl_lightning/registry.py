"""A small name -> builder registry (in the spirit of timm's), with errors that list the choices."""
from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class SSLError(ValueError):
    """A user-facing error (configuration or input): the message names the problem and the fix."""


class Registry(Generic[T]):
    """Maps names to builders. ``registry.get("nme")`` raises an error listing the registered names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            key = (name or getattr(obj, "__name__")).lower()
            if key in self._items:
                raise KeyError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        key = name.lower()
        if key not in self._items:
            raise SSLError(
                f"Unknown {self.kind} {name!r}. Registered {self.kind}s: {', '.join(self.names())}."
            )
        return self._items[key]

    def build(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)  # type: ignore[operator]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._items
