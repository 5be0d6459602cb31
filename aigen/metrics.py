"""Prometheus metrics: the saga's counters plus gauges read at scrape time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

_COUNTERS = {
    "results": ("aigen_results_total", "Results from n8n by type and outcome",
                ["event_type", "outcome"]),
    "dead_lettered": ("aigen_results_dead_lettered_total", "Results dead-lettered", ["reason"]),
    "transitions": ("aigen_transitions_total", "Saga triggers fired", ["trigger"]),
    "credits": ("aigen_credit_steps_total", "Credit steps", ["op"]),
    "deadlines": ("aigen_deadlines_fired_total", "Timers fired by the sweeper", ["kind"]),
    "concurrency_conflicts": ("aigen_concurrency_conflicts_total",
                              "Optimistic-lock conflicts retried", []),
    "compensations": ("aigen_compensations_total",
                      "Releases deferred because billing did not answer", []),
    "compensation_retries": ("aigen_compensation_retries_total",
                             "Deferred releases retried without success", []),
    "outbox_published": ("aigen_outbox_batches_total", "Outbox batches published", ["outcome"]),
    "unroutable": ("aigen_unroutable_messages_total", "Messages no queue was bound for",
                   ["exchange"]),
    "parked": ("aigen_sagas_parked_total", "Sagas parked for support (attention)",
               ["kind", "cause"]),
    "fire_failures": ("aigen_deadline_fire_failures_total",
                      "Deadline firings that raised (retried later or parked)", ["cause"]),
    "deadlines_deferred": ("aigen_deadlines_deferred_total",
                           "Deadlines that waited for a commit sent to billing to come back",
                           ["reason"]),
    "result_redeliveries": ("aigen_result_redeliveries_total",
                            "Results republished after a transient failure", []),
    "result_batches": ("aigen_result_batches_total",
                       "Result batches of two or more: committed in one transaction, or split "
                       "into one per result because the batch failed", ["outcome"]),
}


class PrometheusObserver:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._counters = {
            name: Counter(metric, doc, labels, registry=registry)
            for name, (metric, doc, labels) in _COUNTERS.items()
        }
        # (name, *label items) -> the labelled child: ``Counter.labels`` validates the names
        # and takes a lock on every call (about 4 us; ~10 counts per generation). A child
        # lives as long as its counter, so the cache holds no more than prometheus already
        # does; a racing first count only stores the same child twice.
        self._children: dict[tuple[object, ...], Any] = {}

    def count(self, name: str, **labels: str) -> None:
        key = (name, *labels.items())
        child = self._children.get(key)
        if child is None:
            counter = self._counters.get(name)
            if counter is None:
                return
            child = counter.labels(**labels) if labels else counter  # raises on wrong names
            self._children[key] = child
        child.inc()

    def gauge(self, metric: str, doc: str, read: Callable[[], float]) -> None:
        gauge = Gauge(metric, doc, registry=self.registry)
        gauge.set_function(read)
