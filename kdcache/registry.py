"""One registry type for models, datasets, recipes and methods (timm style: a dict plus a decorator).

An unknown name answers with the close matches and the full list, so a typo is a one-line fix.
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from kdcache.errors import KDCacheError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, flag: str):
        self.kind, self.flag = kind, flag
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"duplicate {self.kind} name {name!r}")
            self._entries[name] = obj
            return obj

        return add

    def add(self, name: str, obj: T) -> T:
        return self.register(name)(obj)

    def get(self, name: str) -> T:
        if name not in self._entries:
            close = difflib.get_close_matches(name, list(self._entries), n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise KDCacheError(
                f"unknown {self.kind} {name!r}{hint}",
                expected=f"one of: {', '.join(sorted(self._entries))}",
                fix=f"pass a valid name to {self.flag}",
            )
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
