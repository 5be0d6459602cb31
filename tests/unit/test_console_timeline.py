"""History events read as sentences on the console's timeline."""

from __future__ import annotations

from api.console.timeline import describe, timeline


def test_credit_steps_and_results_read_as_sentences() -> None:
    assert describe({"kind": "credit", "actor": "system",
                     "detail": {"op": "reserve", "amount": "0.25", "stage": "samples"}}) \
        == "held 0.25 for the samples round"
    assert describe({"kind": "credit", "actor": "system",
                     "detail": {"op": "commit", "amount": "1.00", "stage": "final"}}) \
        == "charged 1.00 for the final"
    assert describe({"kind": "message_in", "actor": "n8n",
                     "detail": {"event_type": "AIGenerationSamplesReady", "samples": 4}}) \
        == "n8n delivered 4 samples"


def test_transitions_and_refusals_say_what_and_why() -> None:
    assert describe({"kind": "transition", "actor": "odoo", "trigger": "cancel",
                     "from_state": "awaiting_selection", "to_state": "cancelled",
                     "detail": {"reason": "customer asked"}}) == (
        "odoo cancel: awaiting selection → cancelled (reason: customer asked)")
    text = describe({"kind": "rejected", "actor": "odoo",
                     "detail": {"reason": "invalid_state", "trigger": "cancel",
                                "message": "cannot cancel a generation in state 'completed'"}})
    assert text == ("refused odoo cancel: invalid_state — cannot cancel a generation in "
                    "state 'completed'")


def test_each_line_has_its_clock_time_and_raw_json() -> None:
    [line] = timeline([{"kind": "note", "actor": "support", "at": "2026-12-01T10:02:03.5Z",
                        "detail": {"reason": "checked billing"}}])
    assert line.time == "10:02:03"
    assert line.text == "support note: checked billing"
    assert '"reason": "checked billing"' in line.raw
    assert not line.refused
