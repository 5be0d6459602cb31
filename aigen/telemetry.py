"""OpenTelemetry tracing, configured only by the standard ``OTEL_*`` environment variables.

``configure()`` turns tracing on when the environment asks for it (``OTEL_TRACES_EXPORTER``
other than ``none``, or an ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``) and leaves it off
otherwise, or when ``OTEL_SDK_DISABLED=true``. The SDK itself reads every other variable
(service name, resource attributes, sampler, batch processor, exporter endpoint, headers,
timeouts): this module only decides *whether* to start it, and does so through
``opentelemetry-distro``'s configurator, the same code ``opentelemetry-instrument`` runs.

Off costs (almost) nothing: no ``opentelemetry`` module is imported (importing the API alone
takes ~60 ms and pulls in entry-point scanning), every helper returns after one global
lookup, and ``span()`` hands back a shared no-op context manager.

Context survives the transactional outbox by hand, as W3C ``traceparent`` strings:
``current_traceparent()`` is stored with each outbox row / timer, ``inject_headers()`` puts it
on the AMQP message, ``extract_context()`` / ``span(parent=...)`` continue it on the other
side, ``link_to()`` opens a fired timer's span. See docs/tracing.md.

Over 300 lines on purpose: all contact with OpenTelemetry is here, so nothing else imports
it and tracing that is off costs nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import TracerProvider

__all__ = [
    "TRACEPARENT",
    "SpanLike",
    "add_trace_ids",
    "configure",
    "current_trace_id",
    "current_traceparent",
    "disable",
    "enabled",
    "extract_context",
    "inject_headers",
    "instrument_fastapi",
    "instrument_sqlalchemy",
    "link_to",
    "requested_exporters",
    "shutdown",
    "span",
    "span_event",
    "trace_id_from_traceparent",
]

TRACEPARENT = "traceparent"
SpanKindName = Literal["internal", "server", "client", "producer", "consumer"]


class SpanLike(Protocol):
    """The part of an OpenTelemetry span the core uses; the no-op span has the same."""

    def set_attribute(self, key: str, value: Any) -> None: ...

    def add_event(self, name: str, attributes: Any = None, timestamp: int | None = None) -> None:
        ...

    def record_exception(self, exception: BaseException, attributes: Any = None,
                         timestamp: int | None = None, escaped: bool = False) -> None: ...

    def is_recording(self) -> bool: ...


class _NoopSpan:
    __slots__ = ()

    def set_attribute(self, key: str, value: Any) -> None:
        return None

    def add_event(self, name: str, attributes: Any = None, timestamp: int | None = None) -> None:
        return None

    def record_exception(self, exception: BaseException, attributes: Any = None,
                         timestamp: int | None = None, escaped: bool = False) -> None:
        return None

    def is_recording(self) -> bool:
        return False


class _NoopSpanContextManager(AbstractContextManager[SpanLike]):
    __slots__ = ()

    def __enter__(self) -> SpanLike:
        return _NOOP_SPAN

    def __exit__(self, *exc: object) -> None:
        return None


_NOOP_SPAN = _NoopSpan()
_NOOP_CM = _NoopSpanContextManager()

# Set by _use() once tracing is on; None means off. Kept as plain module globals so that the
# "off" check in every helper is a single global lookup.
_tracer: Any = None
_provider: Any = None
_owns_provider = False
_trace_api: Any = None
_context_api: Any = None
_propagator: Any = None
_link_cls: Any = None
_kinds: dict[str, Any] = {}

_TRUE = ("true", "1", "yes", "on")


# -- configuration --------------------------------------------------------------------------
def requested_exporters(environ: Mapping[str, str]) -> list[str] | None:
    """Which span exporters the environment asks for: None = tracing off.

    ``[]`` means "the SDK reads ``OTEL_TRACES_EXPORTER`` itself". An OTLP endpoint without
    ``OTEL_TRACES_EXPORTER`` means OTLP, over HTTP/protobuf unless
    ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`` says otherwise (the OTLP specification's
    default; the Python SDK alone would pick gRPC, which is not installed).
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE:
        return None
    names = environ.get("OTEL_TRACES_EXPORTER", "").strip()
    if names:
        return None if names.lower() == "none" else []
    endpoint = (environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
                or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip())
    if not endpoint:
        return None
    protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "").strip()
                or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").strip())
    return ["otlp"] if protocol else ["otlp_proto_http"]


def configure(*, tracer_provider: TracerProvider | None = None) -> bool:
    """Start tracing if the ``OTEL_*`` environment asks for it; returns whether it is on.

    Idempotent. If the process already runs an SDK ``TracerProvider`` (started by
    ``opentelemetry-instrument`` or by the host), that one is used. ``tracer_provider``
    (tests) uses the given provider without touching the global one. A configuration the
    SDK cannot satisfy (e.g. ``OTEL_EXPORTER_OTLP_PROTOCOL=grpc`` without the gRPC exporter)
    is logged and leaves tracing off: tracing never stops the service from starting.
    """
    if _tracer is not None:
        return True
    if tracer_provider is not None:
        _use(tracer_provider, owned=False)
        return True
    exporters = requested_exporters(os.environ)
    if exporters is None:
        return False
    import logging

    log = logging.getLogger(__name__)
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider

        current = trace.get_tracer_provider()
        if isinstance(current, SdkTracerProvider):
            _use(current, owned=False)
            return True
        from opentelemetry.distro import OpenTelemetryConfigurator

        OpenTelemetryConfigurator().configure(  # type: ignore[no-untyped-call]
            trace_exporter_names=exporters)
        provider = trace.get_tracer_provider()
        if not isinstance(provider, SdkTracerProvider):  # pragma: no cover - SDK contract
            raise RuntimeError("the OpenTelemetry SDK did not install a TracerProvider")
    except Exception as exc:
        log.error("tracing requested by OTEL_* but not started: %s", exc)
        return False
    _use(provider, owned=True)
    log.info("tracing on: exporters %s", exporters or os.environ.get("OTEL_TRACES_EXPORTER"))
    return True


def _use(provider: Any, *, owned: bool) -> None:
    global _tracer, _provider, _owns_provider, _trace_api, _context_api, _propagator
    global _link_cls, _kinds
    from opentelemetry import context, trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _trace_api = trace
    _context_api = context
    _propagator = TraceContextTextMapPropagator()
    _link_cls = trace.Link
    _kinds = {name: getattr(trace.SpanKind, name.upper())
              for name in ("internal", "server", "client", "producer", "consumer")}
    _provider = provider
    _owns_provider = owned
    _tracer = provider.get_tracer("aigen")


def enabled() -> bool:
    return _tracer is not None


def disable() -> None:
    """Stop tracing from here on (the helpers become no-ops again); does not flush."""
    global _tracer, _provider, _owns_provider
    _tracer = None
    _provider = None
    _owns_provider = False


def shutdown() -> None:
    """Flush and stop the provider this module started (a no-op when tracing is off)."""
    provider, owned = _provider, _owns_provider
    disable()
    if provider is not None and owned:
        provider.shutdown()


# -- propagation ----------------------------------------------------------------------------
def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the active span, or None (tracing off, or no span)."""
    if _tracer is None:
        return None
    if not _trace_api.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get(TRACEPARENT)


def current_trace_id() -> str | None:
    """The active span's trace id (32 hex digits) for the saga history, or None."""
    if _tracer is None:
        return None
    ctx = _trace_api.get_current_span().get_span_context()
    return _trace_api.format_trace_id(ctx.trace_id) if ctx.is_valid else None


def trace_id_from_traceparent(traceparent: str | None) -> str | None:
    """The trace id inside a stored traceparent; pure string work, so it works when off."""
    if not traceparent:
        return None
    parts = traceparent.strip().split("-")
    if len(parts) < 4 or len(parts[1]) != 32:
        return None
    trace_id = parts[1].lower()
    try:
        int(trace_id, 16)
    except ValueError:
        return None
    return None if trace_id == "0" * 32 else trace_id


def inject_headers(headers: MutableMapping[str, Any],
                   traceparent: str | None) -> MutableMapping[str, Any]:
    """Put ``traceparent`` into AMQP ``headers`` (in place, also returned).

    Nothing happens when tracing is off or ``traceparent`` is None. The relay passes the
    traceparent stored with the outbox row, or, inside its publish span,
    ``current_traceparent()``.
    """
    if _tracer is not None and traceparent:
        headers[TRACEPARENT] = traceparent
    return headers


def extract_context(source: Any) -> Context | None:
    """The context carried by a traceparent string, AMQP headers or a ``trace`` object.

    Returns None when tracing is off, or when there is no well-formed traceparent (a missing,
    malformed or all-zero one never becomes a parent).
    """
    if _tracer is None or source is None:
        return None
    if isinstance(source, _context_api.Context):
        return None  # already extracted: a Context is a dict, but no carrier
    if isinstance(source, str):
        value: Any = source
    elif isinstance(source, Mapping):
        value = source.get(TRACEPARENT)
        if isinstance(value, bytes | bytearray):
            value = bytes(value).decode("ascii", "replace")
    else:
        return None
    if not isinstance(value, str) or not value:
        return None
    ctx = _propagator.extract({TRACEPARENT: value}, context=_context_api.Context())
    if not _trace_api.get_current_span(ctx).get_span_context().is_valid:
        return None
    return ctx  # type: ignore[no-any-return]


def _parent_context(parent: Any) -> Any:
    if parent is None or isinstance(parent, _context_api.Context):  # a Context is a dict
        return parent
    return extract_context(parent)  # None for anything that carries no traceparent


def _attributes(explicit: Mapping[str, Any] | None, named: Mapping[str, Any]) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    if explicit:
        attrs.update((k, v) for k, v in explicit.items() if v is not None)
    for key, value in named.items():
        if value is None:
            continue
        attrs["aigen." + key] = (value if isinstance(value, str | bool | int | float)
                                 else str(value))
    return attrs


# -- spans ----------------------------------------------------------------------------------
def span(name: str, *, parent: Any = None, kind: SpanKindName = "internal",
         attributes: Mapping[str, Any] | None = None, links: Sequence[Any] = (),
         **named: Any) -> AbstractContextManager[SpanLike]:
    """A span around a block, made current for it.

    ``parent``: a traceparent, AMQP headers or a result's ``trace`` object, or a Context; None
    = the current span (or a new trace). A malformed parent is ignored. Keyword attributes
    are recorded as ``aigen.<name>`` (None values are dropped); ``attributes`` takes names as
    they are (e.g. ``messaging.destination.name``). An exception leaving the block is
    recorded on the span and sets its status to error.
    """
    if _tracer is None:
        return _NOOP_CM
    return _tracer.start_as_current_span(  # type: ignore[no-any-return]
        name, context=_parent_context(parent), kind=_kinds[kind],
        attributes=_attributes(attributes, named), links=links or None)


def link_to(traceparent: str | None, name: str = "timer fired", *,
            continue_trace: bool = True, attributes: Mapping[str, Any] | None = None,
            **named: Any) -> AbstractContextManager[SpanLike]:
    """A fired timer's span, *linked* to the span that armed it (from its stored traceparent).

    By default the span is also a child of the arming span, so the whole generation stays in
    one trace (a deadline hours later still shows on the generation's timeline). With
    ``continue_trace=False`` it starts a new trace that only links to the armed one, the
    OpenTelemetry messaging pattern for work that is caused by, but not part of, a trace.
    Without a usable traceparent it is a plain new-trace span.
    """
    if _tracer is None:
        return _NOOP_CM
    armed = extract_context(traceparent)
    links: list[Any] = []
    if armed is not None:
        links.append(_link_cls(_trace_api.get_current_span(armed).get_span_context(),
                               {"aigen.link": "armed_by"}))
    parent = armed if (continue_trace and armed is not None) else _context_api.Context()
    return _tracer.start_as_current_span(  # type: ignore[no-any-return]
        name, context=parent, kind=_kinds["internal"], attributes=_attributes(attributes, named),
        links=links or None)


def span_event(name: str, *, attributes: Mapping[str, Any] | None = None,
               **named: Any) -> bool:
    """Add an event (e.g. ``message refused`` with its reason) to the current span.

    Returns whether it was recorded (False when tracing is off or no span is recording).
    """
    if _tracer is None:
        return False
    current = _trace_api.get_current_span()
    if not current.is_recording():
        return False
    current.add_event(name, _attributes(attributes, named))
    return True


# -- logs -----------------------------------------------------------------------------------
def add_trace_ids(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]
                  ) -> MutableMapping[str, Any]:
    """structlog processor: ``trace_id`` / ``span_id`` of the active span on every log line.

    Added whenever a valid span is active (also a sampled-out one: the trace id recorded in
    the saga's history then still finds the logs); never overwrites ids already given.
    """
    if _tracer is None:
        return event_dict
    ctx = _trace_api.get_current_span().get_span_context()
    if ctx.is_valid:
        event_dict.setdefault("trace_id", _trace_api.format_trace_id(ctx.trace_id))
        event_dict.setdefault("span_id", _trace_api.format_span_id(ctx.span_id))
    return event_dict


# -- maintained instrumentations (installed only when tracing is on) -----------------------
def _instrumentation_disabled(name: str) -> bool:
    disabled = os.environ.get("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", "")
    return name in {part.strip() for part in disabled.split(",")}


def _meter_provider() -> Any:
    """The instrumentations also record OTel metrics; skip that unless metrics are exported
    (the service's metrics are Prometheus ones)."""
    names = os.environ.get("OTEL_METRICS_EXPORTER", "").strip().lower()
    if names and names != "none":
        return None  # the global one the SDK configured
    from opentelemetry.metrics import NoOpMeterProvider

    return NoOpMeterProvider()


#: Health probes and scrapes would be most of the HTTP spans; used unless
#: OTEL_PYTHON_FASTAPI_EXCLUDED_URLS / OTEL_PYTHON_EXCLUDED_URLS say otherwise.
DEFAULT_EXCLUDED_URLS = "/health/live$,/health/ready$,/metrics$"


def instrument_fastapi(app: Any) -> bool:
    """One SERVER span per HTTP request (continuing an incoming ``traceparent``).

    Call before the app serves its first request. No-op when tracing is off or
    ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS`` contains ``fastapi``.
    """
    if _tracer is None or _instrumentation_disabled("fastapi"):
        return False
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    from_env = (os.environ.get("OTEL_PYTHON_FASTAPI_EXCLUDED_URLS")
                or os.environ.get("OTEL_PYTHON_EXCLUDED_URLS"))
    FastAPIInstrumentor.instrument_app(
        app, tracer_provider=_provider, meter_provider=_meter_provider(),
        excluded_urls=None if from_env else DEFAULT_EXCLUDED_URLS,
        exclude_spans=["receive", "send"])
    return True


def instrument_sqlalchemy(engine: Any) -> bool:
    """One CLIENT span per SQL statement on ``engine``.

    No-op when tracing is off or ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS`` contains
    ``sqlalchemy``. The instrumentor is process-wide (once per process).

    The instrumentation declares ``sqlalchemy < 2.1`` (the upper bound is the newest release
    its maintainers had tested, not a known break); it works unchanged on 2.1 (see
    tests/unit/test_telemetry.py), so its version check is skipped.
    """
    if _tracer is None or _instrumentation_disabled("sqlalchemy"):
        return False
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    SQLAlchemyInstrumentor().instrument(engine=engine, tracer_provider=_provider,
                                        meter_provider=_meter_provider(), skip_dep_check=True)
    return True
