"""One registry type for every extensible axis: datasets, models, noise kinds, pruners.

An entry is a frozen dataclass (name, the callable, what it needs, a description), in the style of
timm's optimizer registry; the registry maps names to entries, lists them in registration order and
rejects an unknown name with a one-line ``ValueError`` that lists the known ones. Regularizers keep
their own richer registry (``study.regularizers``: parameter specs, schedules, import paths) with the
same behaviour.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any, Generic, Protocol, TypeVar


class _Named(Protocol):
    name: str


T = TypeVar("T", bound=_Named)


class Registry(Generic[T]):
    """Name -> entry. ``what`` names the axis in error messages ("dataset", "model", ...)."""

    def __init__(self, what: str, entries: list[T] | tuple[T, ...] = ()) -> None:
        self.what = what
        self._entries: dict[str, T] = {}
        for entry in entries:
            self.register(entry)

    def register(self, entry: T, *, replace: bool = False) -> T:
        """Add ``entry`` under ``entry.name``; a taken name is an error unless ``replace``."""
        name = entry.name
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.what} name must be a non-empty string, but got {name!r}.")
        if name in self._entries and not replace:
            raise ValueError(f"a {self.what} named {name!r} is already registered.")
        self._entries[name] = entry
        return entry

    def remove(self, name: str) -> T:
        """Take an entry out (a test's temporary entry, or replacing a built-in one)."""
        entry = self[name]
        del self._entries[name]
        return entry

    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str, default: T | None = None) -> T | None:
        return self._entries.get(name, default)

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {self.what} {name!r} (allowed: {', '.join(self._entries)})") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def values(self) -> list[T]:
        return list(self._entries.values())

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())


_OPTION_TYPES: dict[type, tuple[Callable[[Any], bool], str]] = {
    bool: (lambda v: isinstance(v, bool), "true or false"),  # before int: True is an int
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    str: (lambda v: isinstance(v, str), "a string"),
    tuple: (lambda v: isinstance(v, (tuple, list)), "a list"),
    list: (lambda v: isinstance(v, (tuple, list)), "a list"),
}


def check_option_types(builder: Callable[..., Any], options: dict[str, Any]) -> None:
    """Each option has the type of the builder's default (a width is not "wide", a flag is not 1): the
    builder's signature is the rule, so `study validate` and the trial refuse the same values.

    Raises:
        ValueError: ``"<option> must be <kind>, but got <value>."``
    """
    params = inspect.signature(builder).parameters
    for key, value in options.items():
        default = params[key].default if key in params else None
        kind = next((t for t in _OPTION_TYPES if isinstance(default, t)), None)
        if kind is not None and not _OPTION_TYPES[kind][0](value):
            raise ValueError(f"{key} must be {_OPTION_TYPES[kind][1]}, but got {value!r}.")
