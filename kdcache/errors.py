"""User-facing errors: what was wrong, what was expected, and the command that fixes it.

The CLI catches `KDCacheError` and prints it as one clear message instead of a traceback; anything
else is a bug and keeps its traceback (after a one-line explanation).
"""

from __future__ import annotations


class KDCacheError(Exception):
    """An error the user can act on."""

    def __init__(self, what: str, *, expected: str | None = None, fix: str | None = None):
        self.what, self.expected, self.fix = what, expected, fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        parts = [self.what]
        if self.expected:
            parts.append(f"expected: {self.expected}")
        if self.fix:
            parts.append(f"fix: {self.fix}")
        return "\n  ".join(parts)
