"""PrometheusObserver: a cached labelled child counts into the same sample as ``labels()``."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from aigen.metrics import PrometheusObserver


def _value(registry: CollectorRegistry, metric: str, **labels: str) -> float | None:
    return registry.get_sample_value(metric, labels)


def test_counts_land_on_the_labelled_sample_whatever_the_keyword_order() -> None:
    registry = CollectorRegistry()
    observer = PrometheusObserver(registry)
    for _ in range(3):
        observer.count("results", event_type="AIGenerationSamplesReady", outcome="applied")
    observer.count("results", outcome="applied", event_type="AIGenerationSamplesReady")
    observer.count("results", event_type="AIGenerationSamplesReady", outcome="duplicate")
    assert _value(registry, "aigen_results_total", event_type="AIGenerationSamplesReady",
                  outcome="applied") == 4
    assert _value(registry, "aigen_results_total", event_type="AIGenerationSamplesReady",
                  outcome="duplicate") == 1


def test_a_counter_without_labels_and_an_unknown_name() -> None:
    registry = CollectorRegistry()
    observer = PrometheusObserver(registry)
    observer.count("concurrency_conflicts")
    observer.count("concurrency_conflicts")
    observer.count("no_such_counter", anything="x")
    assert _value(registry, "aigen_concurrency_conflicts_total") == 2


def test_wrong_label_names_raise_every_time() -> None:
    observer = PrometheusObserver(CollectorRegistry())
    for _ in range(2):
        with pytest.raises(ValueError):
            observer.count("credits", operation="reserve")
    with pytest.raises(ValueError):
        observer.count("concurrency_conflicts", extra="x")
