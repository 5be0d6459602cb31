"""What the saga and the adapters report for metrics.

It lives in ``saga`` (the ground floor) so both the handlers and ``messaging`` may import it
without importing each other; the composition root plugs Prometheus in.
"""

from __future__ import annotations

from typing import Protocol


class Observer(Protocol):
    """Receives counters for metrics."""

    def count(self, name: str, **labels: str) -> None: ...


class NullObserver:
    """Counts nothing: the default for tests and tools."""

    def count(self, name: str, **labels: str) -> None:
        return None
