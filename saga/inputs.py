"""Checks on untrusted input shared by the API and the result consumer."""

from __future__ import annotations

from typing import Any


def find_nul(value: Any, path: str = "") -> str | None:
    """The dotted path of the first string (or key) containing U+0000, if any."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if "\x00" in str(key):
                return where
            found = find_nul(item, where)
            if found is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = find_nul(item, f"{path}.{index}" if path else str(index))
            if found is not None:
                return found
    return None
