"""What the saga needs from tracing, as a protocol the composition root fills in.

``saga`` does no I/O and imports nothing of ours, so it cannot import the OpenTelemetry
set-up (``aigen.telemetry``). The handlers open their spans (transitions, credit steps,
fired timers) and read the current trace context through a :class:`Tracer` held by the
:class:`~saga.effects.Context`; ``aigen/bootstrap.py`` passes the ``aigen.telemetry``
module, which implements it; the relay and the result consumer (``messaging``, which may
not import ``aigen`` either) get the same object. The default, :class:`NullTracer`, traces
nothing.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol


class Tracer(Protocol):
    def enabled(self) -> bool: ...

    def span(self, name: str, *, parent: Any = None, kind: Any = "internal",
             attributes: Any = None, links: Any = (), **named: Any
             ) -> AbstractContextManager[Any]: ...

    def link_to(self, traceparent: str | None, name: str = "timer fired", *,
                continue_trace: bool = True, attributes: Any = None, **named: Any
                ) -> AbstractContextManager[Any]: ...

    def current_traceparent(self) -> str | None: ...

    def current_trace_id(self) -> str | None: ...

    def span_event(self, name: str, *, attributes: Any = None, **named: Any) -> bool: ...


class _NullSpan:
    def set_attribute(self, key: str, value: Any) -> None:
        return None


_NULL_CM: AbstractContextManager[Any] = nullcontext(_NullSpan())


class NullTracer:
    """Traces nothing: the default for tests and tools."""

    def enabled(self) -> bool:
        return False

    def span(self, name: str, *, parent: Any = None, kind: Any = "internal",
             attributes: Any = None, links: Any = (), **named: Any
             ) -> AbstractContextManager[Any]:
        return _NULL_CM

    def link_to(self, traceparent: str | None, name: str = "timer fired", *,
                continue_trace: bool = True, attributes: Any = None, **named: Any
                ) -> AbstractContextManager[Any]:
        return _NULL_CM

    def current_traceparent(self) -> str | None:
        return None

    def current_trace_id(self) -> str | None:
        return None

    def span_event(self, name: str, *, attributes: Any = None, **named: Any) -> bool:
        return False
