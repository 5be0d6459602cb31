"""bench/profile_summary.py files each frame under the component docs/tracing.md quotes."""

from pathlib import Path

from bench.profile_summary import component, summarize


def test_tracing_hooks_have_their_own_component() -> None:
    label = "tracing (aigen/telemetry, saga/tracing, opentelemetry)"
    assert component("aigen/telemetry.py", "span") == label
    assert component("/work/main/saga/tracing.py", "NullTracer.span") == label
    assert component("opentelemetry/trace/__init__.py", "get_current_span") == label
    assert component("/work/main/saga/effects.py", "Context.retrying") == "service: saga/"


def test_inclusive_share_counts_a_tracing_frame_anywhere_on_the_stack(tmp_path: Path) -> None:
    raw = tmp_path / "p.txt"
    raw.write_text(
        "thread (1): MainThread;handle (saga/messagebus.py:67);span (aigen/telemetry.py:325) 1\n"
        "thread (1): MainThread;handle (saga/messagebus.py:67) 3\n")
    inclusive = summarize(raw, 10).split("by component, inclusive:")[1]
    assert "25.0 %  tracing (aigen/telemetry, saga/tracing, opentelemetry)" in inclusive
