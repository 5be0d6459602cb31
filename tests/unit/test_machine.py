"""The generation state machine on its own (docs/api.md), without a database.

Every state in ``STATES`` is crossed with every trigger in ``TRIGGERS`` and fired through
:func:`saga.machine.fire` on a realistic saga. The expected outcome of each allowed pair —
destination, intents and credits — is written out in :data:`EXPECTED`, so a changed transition
table, a missing callback or a wrong credit step fails here.

Longer than 300 lines because the saga builders, :data:`EXPECTED` and the tests that read it
are one table; the guard, compensation and pricing tests below reuse the same builders.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from transitions import Machine

from saga import intents as it
from saga import triggers as tg
from saga.errors import InvalidState, UnknownSample
from saga.machine import MACHINE, STATES, TRIGGERS, SagaMachine, allowed_triggers, fire
from saga.model import TERMINAL_STATES as TERMINAL
from saga.model import Generation, SagaConfig
from saga.pricing import PLANS, PriceBook, final_output
from saga.values import Compensation, Hold, SagaError

CFG = SagaConfig()
T0 = datetime(2026, 11, 2, 12, 0, tzinfo=UTC)
NOW = T0 + timedelta(minutes=1)  # when every trigger below fires
FORMAT = {"name": "instagram_post", "width": 1080, "height": 1080}
SAMPLES = [{"sample_id": f"s{i}", "url": f"s3://creativeflow-assets/u/s{i}.png",
            "width": 512, "height": 512} for i in range(1, 5)]
ASSET = {"url": "s3://creativeflow-assets/u/final.png", "width": 2048, "height": 2048,
         "format": "png"}
SAMPLE_HOLD = Hold("hold-s1", "samples", Decimal("0.25"))
FINAL_HOLD = Hold("hold-f1", "final", Decimal("1.00"))
FATAL = {"code": "model_unavailable", "message": "gpu on fire", "retryable": False}
RETRYABLE = {"code": "model_unavailable", "message": "try later", "retryable": True}

TIMER_TRIGGERS = {"timeout", "redispatch", "compensated"}
D = Decimal


# ------------------------------------------------------------------ sagas in every state
def _processing_samples(g: Generation) -> None:
    g.stage, g.attempt, g.job_id, g.round = "samples", 1, "job-s1", 1
    g.hold, g.held = SAMPLE_HOLD, D("0.25")
    g.due_at, g.due_kind = NOW + timedelta(seconds=60), "stage"


def _awaiting_selection(g: Generation) -> None:
    g.samples, g.charged, g.round, g.attempt = copy.deepcopy(SAMPLES), D("0.25"), 1, 1
    g.due_at, g.due_kind = NOW + timedelta(hours=23), "selection"


def _processing_final(g: Generation) -> None:
    _awaiting_selection(g)
    g.selected_sample_id, g.resolution = "s2", "standard"
    g.stage, g.attempt, g.job_id = "final", 1, "job-f1"
    g.hold, g.held = FINAL_HOLD, D("1.00")
    g.due_at, g.due_kind = NOW + timedelta(seconds=300), "stage"


# Where a compensating saga was headed, and the stage whose hold is still open.
COMPENSATIONS = {
    "awaiting_selection": ("result_failed", _processing_final),
    "failed": ("result_failed", _processing_samples),
    "timed_out": ("timeout", _processing_samples),
    "cancelled": ("cancel", _processing_samples),
}


def saga_in(state: str, *, due: bool = False, retry_pending: bool = False,
            target: str = "awaiting_selection") -> Generation:
    """A saga in ``state`` with the fields that state implies.

    ``due``: the pending timer has passed (``due_at`` < NOW) so the timer guards pass.
    ``retry_pending``: a processing saga waiting for its retry (no current job).
    ``target``: where a ``compensating`` saga lands once its release goes through.
    """
    g = Generation(id="gen-1", user_id="u-1", prompt="spring sale", format=dict(FORMAT),
                   created_at=T0, updated_at=T0, project_id="p-7")
    if state == "processing_samples":
        _processing_samples(g)
    elif state == "awaiting_selection":
        _awaiting_selection(g)
    elif state == "processing_final":
        _processing_final(g)
    elif state == "compensating":
        trigger, setup = COMPENSATIONS[target]
        setup(g)
        g.job_id, g.due_kind = None, "compensate"
        g.compensation = Compensation(target, trigger,
                                      FATAL if trigger == "result_failed" else None, 1)
    elif state == "completed":
        _awaiting_selection(g)
        g.selected_sample_id, g.resolution, g.stage = "s2", "standard", "final"
        g.final_asset, g.charged, g.due_at, g.due_kind = dict(ASSET), D("1.25"), None, None
    elif state in ("failed", "timed_out", "cancelled"):
        g.stage, g.attempt, g.round, g.released = "samples", 1, 1, D("0.25")
        g.error = SagaError(state, "x", False)
    elif state == "expired":
        _awaiting_selection(g)
        g.due_at, g.due_kind = None, None
    else:
        assert state == "requested"
    g.state = state
    if retry_pending:
        g.job_id, g.due_kind = None, "retry"
        g.due_at = NOW + timedelta(seconds=1)
    if due and g.due_at is not None:
        g.due_at = NOW - timedelta(seconds=1)
    return g


BILLING_TARGET = {"processing_samples": ("failed", "result_failed"),
                  "processing_final": ("awaiting_selection", "timeout"),
                  "awaiting_selection": ("cancelled", "cancel")}


# Who fires each trigger in the handlers; the payload types say what each one carries.
ACTORS: dict[str, it.Actor] = {
    "start": "odoo", "select": "odoo", "regenerate": "odoo", "cancel": "odoo",
    "samples_ready": "n8n", "final_ready": "n8n", "result_failed": "n8n",
    "timeout": "timer", "redispatch": "timer", "compensated": "timer",
    "billing_unavailable": "system",
}


def example(trigger: str, state: str = "", **fields: Any) -> tg.Trigger:
    """A realistic payload for ``trigger`` (fired on a saga in ``state``)."""
    target, original = BILLING_TARGET.get(state, ("cancelled", "cancel"))
    payloads: dict[str, tg.Trigger] = {
        "start": tg.Start(price=D("0.25")),
        "select": tg.Select(price=D("1.00"), sample_id="s3", resolution="standard",
                            detail={"sample_id": "s3", "resolution": "standard"}),
        "regenerate": tg.Regenerate(price=D("0.25"), prompt=None,
                                    detail={"new_prompt": False}),
        "cancel": tg.Cancel(),
        "samples_ready": tg.SamplesReady(samples=copy.deepcopy(SAMPLES),
                                         detail={"job_id": "job-s1"}),
        "final_ready": tg.FinalReady(asset=dict(ASSET), detail={"job_id": "job-f1"}),
        "result_failed": tg.ResultFailed(error=dict(FATAL), detail={"error": FATAL}),
        "timeout": tg.Timeout(),
        "redispatch": tg.Redispatch(),
        "compensated": tg.Compensated(error=dict(FATAL)),
        "billing_unavailable": tg.BillingUnavailable(
            target=target, original_trigger=original, error=None,
            detail={"reason": "billing backend unavailable", "target": target}),
    }
    return replace(payloads[trigger], **fields)


def fire_(saga: Generation, payload: tg.Trigger, *, now: datetime = NOW,
          config: SagaConfig = CFG) -> bool:
    return fire(saga, payload, now=now, actor=ACTORS[payload.name], config=config)


def prepared(state: str, trigger: str) -> Generation:
    return saga_in(state, due=trigger in TIMER_TRIGGERS, retry_pending=trigger == "redispatch")


# ------------------------------------------------------------------ describing intents
def describe(intent: it.Intent) -> tuple[Any, ...]:
    if isinstance(intent, it.HistoryEntry):
        if intent.kind == "transition":
            return ("transition", intent.trigger, intent.from_state, intent.to_state)
        return (intent.kind,)
    if isinstance(intent, it.Reserve):
        return ("reserve", intent.stage, str(intent.amount))
    if isinstance(intent, it.Commit | it.Release):
        op = "commit" if isinstance(intent, it.Commit) else "release"
        return (op, intent.hold_id, intent.stage, str(intent.amount))
    if isinstance(intent, it.Waive):
        return ("waive", intent.stage)
    if isinstance(intent, it.DispatchJob):
        return ("dispatch", intent.stage, intent.attempt)
    if isinstance(intent, it.Notify):
        return ("notify", intent.type)
    if isinstance(intent, it.PublishStateChanged):
        return ("state_changed", intent.from_state, intent.to_state)
    raise AssertionError(f"unexpected intent {intent!r}")


def credits(held: str, charged: str, released: str) -> dict[str, str]:
    return {"held": held, "charged": charged, "released": released}


def tr(trigger: str, src: str, dst: str) -> tuple[str, ...]:
    return ("transition", trigger, src, dst)


def sc(src: str, dst: str) -> tuple[str, ...]:
    return ("state_changed", src, dst)


PS, AS, PF, CO = "processing_samples", "awaiting_selection", "processing_final", "compensating"
REL_S = ("release", "hold-s1", "samples", "0.25")
REL_F = ("release", "hold-f1", "final", "1.00")

# (state, trigger) -> (destination, intents in order, credits afterwards) for every allowed
# pair; everything not listed must raise InvalidState. Contract §1 and §2.
EXPECTED: dict[tuple[str, str], tuple[str, list[tuple[Any, ...]], dict[str, str]]] = {
    ("requested", "start"): (PS, [
        tr("start", "requested", PS), ("reserve", "samples", "0.25"), ("dispatch", "samples", 1),
        sc("requested", PS)], credits("0.25", "0.00", "0.00")),
    ("requested", "cancel"): ("cancelled", [
        tr("cancel", "requested", "cancelled"), ("notify", "cancelled"),
        sc("requested", "cancelled")], credits("0.00", "0.00", "0.00")),
    (PS, "samples_ready"): (AS, [
        tr("samples_ready", PS, AS), ("commit", "hold-s1", "samples", "0.25"),
        ("notify", "samples_ready"), sc(PS, AS)], credits("0.00", "0.25", "0.00")),
    (PS, "result_failed"): ("failed", [
        tr("result_failed", PS, "failed"), REL_S, ("notify", "failed"), sc(PS, "failed")],
        credits("0.00", "0.00", "0.25")),
    (PS, "redispatch"): (PS, [
        tr("redispatch", PS, PS), ("dispatch", "samples", 2)], credits("0.25", "0.00", "0.00")),
    (PS, "timeout"): ("timed_out", [
        tr("timeout", PS, "timed_out"), REL_S, ("notify", "timed_out"), sc(PS, "timed_out")],
        credits("0.00", "0.00", "0.25")),
    (PS, "cancel"): ("cancelled", [
        tr("cancel", PS, "cancelled"), REL_S, ("notify", "cancelled"), sc(PS, "cancelled")],
        credits("0.00", "0.00", "0.25")),
    (PS, "billing_unavailable"): (CO, [
        tr("billing_unavailable", PS, CO), sc(PS, CO)], credits("0.25", "0.00", "0.00")),
    (AS, "select"): (PF, [
        tr("select", AS, PF), ("reserve", "final", "1.00"), ("dispatch", "final", 1), sc(AS, PF)],
        credits("1.00", "0.25", "0.00")),
    (AS, "regenerate"): (PS, [
        tr("regenerate", AS, PS), ("reserve", "samples", "0.25"), ("dispatch", "samples", 1),
        sc(AS, PS)], credits("0.25", "0.25", "0.00")),
    (AS, "timeout"): ("expired", [
        tr("timeout", AS, "expired"), ("notify", "expired"), sc(AS, "expired")],
        credits("0.00", "0.25", "0.00")),
    (AS, "cancel"): ("cancelled", [
        tr("cancel", AS, "cancelled"), ("notify", "cancelled"), sc(AS, "cancelled")],
        credits("0.00", "0.25", "0.00")),
    (AS, "billing_unavailable"): (CO, [
        tr("billing_unavailable", AS, CO), sc(AS, CO)], credits("0.00", "0.25", "0.00")),
    (PF, "final_ready"): ("completed", [
        tr("final_ready", PF, "completed"), ("commit", "hold-f1", "final", "1.00"),
        ("notify", "final_ready"), sc(PF, "completed")], credits("0.00", "1.25", "0.00")),
    (PF, "result_failed"): (AS, [
        tr("result_failed", PF, AS), REL_F, ("notify", "final_failed"), sc(PF, AS)],
        credits("0.00", "0.25", "1.00")),
    (PF, "redispatch"): (PF, [
        tr("redispatch", PF, PF), ("dispatch", "final", 2)], credits("1.00", "0.25", "0.00")),
    (PF, "timeout"): (AS, [
        tr("timeout", PF, AS), REL_F, ("notify", "final_timed_out"), sc(PF, AS)],
        credits("0.00", "0.25", "1.00")),
    (PF, "cancel"): ("cancelled", [
        tr("cancel", PF, "cancelled"), REL_F, ("notify", "cancelled"), sc(PF, "cancelled")],
        credits("0.00", "0.25", "1.00")),
    (PF, "billing_unavailable"): (CO, [
        tr("billing_unavailable", PF, CO), sc(PF, CO)], credits("1.00", "0.25", "0.00")),
    # The default compensating saga was headed back to awaiting_selection after a final
    # failure: cancelling only retargets it, the compensation then releases the final hold.
    (CO, "cancel"): (CO, [tr("cancel", CO, CO)], credits("1.00", "0.25", "0.00")),
    (CO, "compensated"): (AS, [
        tr("compensated", CO, AS), REL_F, ("notify", "final_failed"), sc(CO, AS)],
        credits("0.00", "0.25", "1.00")),
}

ALL_PAIRS = [(s, t) for s in STATES for t in TRIGGERS]
DISALLOWED = [pair for pair in ALL_PAIRS if pair not in EXPECTED]


def test_machine_declares_the_contract_states_and_triggers() -> None:
    """The parametrisation below covers the contract's ten states and every trigger."""
    assert set(STATES) == {"requested", PS, AS, PF, CO, "completed", "failed", "timed_out",
                           "cancelled", "expired"}
    assert set(TERMINAL) == {"completed", "failed", "timed_out", "cancelled", "expired"}
    assert set(TRIGGERS) == {"start", "samples_ready", "select", "regenerate", "final_ready",
                             "result_failed", "redispatch", "timeout", "cancel",
                             "billing_unavailable", "compensated"}


@pytest.mark.parametrize("state", STATES)
def test_allowed_triggers_match_the_table(state: str) -> None:
    """``allowed_triggers`` (used by the handlers' pre-checks) agrees with the table."""
    assert sorted(allowed_triggers(state)) == sorted(t for s, t in EXPECTED if s == state)


@pytest.mark.parametrize("state", [*STATES, "no_such_state"])
def test_the_trigger_table_answers_what_the_library_scan_answers(state: str) -> None:
    """``SagaMachine.get_triggers`` (a table) says what ``transitions``' own scan says."""
    for _ in range(2):  # first from the scan, then from the table
        assert MACHINE.get_triggers(state) == Machine.get_triggers(MACHINE, state)
        assert list(MACHINE.triggers_from(state)) == Machine.get_triggers(MACHINE, state)
    assert "no_such_state" not in MACHINE._triggers_from
    assert MACHINE.get_triggers(*STATES[:3]) == Machine.get_triggers(MACHINE, *STATES[:3])


def test_the_trigger_table_follows_added_and_removed_transitions() -> None:
    machine = SagaMachine(model=None, states=["a", "b"], initial=None, auto_transitions=False,
                          transitions=[{"trigger": "go", "source": "a", "dest": "b"}])
    assert machine.get_triggers("a") == ["go"]
    machine.add_transition("back", "b", "a")
    machine.add_transition("stay", "a", None)
    assert machine.get_triggers("a") == ["go", "stay"]
    assert machine.get_triggers("b") == ["back"]
    machine.remove_transition("go")
    assert machine.get_triggers("a") == ["stay"] == Machine.get_triggers(machine, "a")


@pytest.mark.parametrize(("state", "trigger"), sorted(EXPECTED))
def test_allowed_transition(state: str, trigger: str) -> None:
    """Each allowed pair lands in the contract's state with the right intents and credits."""
    saga = prepared(state, trigger)
    old_job, old_hold = saga.job_id, copy.deepcopy(saga.hold)
    payload = example(trigger, state)

    assert fire_(saga, payload) is True

    dest, intents, expected_credits = EXPECTED[state, trigger]
    assert saga.state == dest
    assert [describe(i) for i in saga.pending] == intents
    assert saga.credits() == expected_credits
    assert saga.updated_at == NOW

    transition = saga.pending[0]
    assert isinstance(transition, it.HistoryEntry)
    assert transition.actor == ACTORS[trigger]
    for key, value in payload.detail.items():
        assert transition.detail[key] == value

    reserves = [i for i in saga.pending if isinstance(i, it.Reserve)]
    if reserves:  # the new hold is the saga's open hold, a fresh id
        (reserve,) = reserves
        assert saga.hold == Hold(reserve.hold_id, reserve.stage, reserve.amount)
        assert reserve.hold_id not in ("hold-s1", "hold-f1")
    elif any(isinstance(i, it.Commit | it.Release) for i in saga.pending):
        assert saga.hold is None  # settled exactly once: nothing left to settle again
    else:
        assert saga.hold == old_hold

    dispatches = [i for i in saga.pending if isinstance(i, it.DispatchJob)]
    if dispatches:  # a new job with its own deadline
        (dispatch,) = dispatches
        assert saga.job_id == dispatch.job_id and dispatch.job_id != old_job
        assert saga.attempt == dispatch.attempt and saga.stage == dispatch.stage
        deadline = CFG.samples_deadline if dispatch.stage == "samples" else CFG.final_deadline
        assert (saga.due_at, saga.due_kind) == (NOW + deadline, "stage")

    if dest in TERMINAL:
        assert saga.terminal
        assert (saga.job_id, saga.due_at, saga.due_kind, saga.hold) == (None, None, None, None)
    if dest == AS:
        assert (saga.due_at, saga.due_kind) == (NOW + CFG.selection_window, "selection")
        assert saga.job_id is None and saga.samples


@pytest.mark.parametrize(("state", "trigger"), DISALLOWED)
def test_disallowed_transition_raises_and_changes_nothing(state: str, trigger: str) -> None:
    """A trigger the state does not allow raises InvalidState and leaves the saga as it was."""
    saga = prepared(state, trigger)
    before = copy.deepcopy(vars(saga))
    with pytest.raises(InvalidState) as err:
        fire_(saga, example(trigger, state))
    assert err.value.code == "invalid_state"
    assert vars(saga) == before


# ------------------------------------------------------------------ guards
def test_select_of_an_undelivered_sample_raises_unknown_sample() -> None:
    """select needs a delivered sample; otherwise UnknownSample and nothing changes."""
    saga = saga_in(AS)
    before = copy.deepcopy(vars(saga))
    with pytest.raises(UnknownSample):
        fire_(saga, example("select", sample_id="s9"))
    assert vars(saga) == before


def test_select_records_sample_and_resolution_for_the_final_job() -> None:
    saga = saga_in(AS)
    fire_(saga, example("select", sample_id="s4", resolution="high",
                                      price=D("2.00")))
    assert (saga.selected_sample_id, saga.resolution) == ("s4", "high")
    assert saga.final_output() == {"width": 4096, "height": 4096, "format": "png"}
    assert saga.hold is not None and saga.hold.amount == D("2.00")


@pytest.mark.parametrize(("attempt", "delay_s"), [(1, 1), (2, 2), (3, 4), (4, 8), (6, 30)])
@pytest.mark.parametrize("state", [PS, PF])
def test_retryable_failure_with_attempts_left_schedules_a_retry(state: str, attempt: int,
                                                                delay_s: int) -> None:
    """Retryable + attempts left: internal transition, job cleared, exponential backoff
    (base 1 s, capped at 30 s), the hold stays open."""
    cfg = SagaConfig(max_attempts=10)
    saga = saga_in(state)
    saga.attempt = attempt
    hold, credits_before = copy.deepcopy(saga.hold), saga.credits()

    assert fire_(saga, example("result_failed", error=dict(RETRYABLE)), config=cfg) is True

    assert saga.state == state and saga.attempt == attempt
    assert saga.job_id is None
    assert (saga.due_kind, saga.due_at) == ("retry", NOW + timedelta(seconds=delay_s))
    assert saga.hold == hold and saga.credits() == credits_before
    assert [describe(i) for i in saga.pending] == [tr("result_failed", state, state), ("note",)]
    note = saga.pending[1]
    assert isinstance(note, it.HistoryEntry) and note.detail["next_attempt"] == attempt + 1


def test_default_backoff_is_exponential() -> None:
    assert [CFG.retry_delay(a).total_seconds() for a in (1, 2, 3, 4)] == [1, 2, 4, 8]


@pytest.mark.parametrize(("state", "dest", "notify", "release"),
                         [(PS, "failed", "failed", REL_S), (PF, AS, "final_failed", REL_F)])
@pytest.mark.parametrize("why", ["max_attempts", "not_retryable"])
def test_failure_that_may_not_retry_ends_the_stage(state: str, dest: str, notify: str,
                                                   release: tuple[str, ...], why: str) -> None:
    """A retryable failure at max_attempts, or any non-retryable one, ends the stage."""
    saga = saga_in(state)
    if why == "max_attempts":
        saga.attempt, error = CFG.max_attempts, dict(RETRYABLE)
    else:
        saga.attempt, error = 1, dict(FATAL)
    assert fire_(saga, example("result_failed", error=error)) is True
    assert saga.state == dest
    assert [describe(i) for i in saga.pending] == [
        tr("result_failed", state, dest), release, ("notify", notify), sc(state, dest)]
    assert saga.hold is None and saga.job_id is None


def test_samples_failure_keeps_user_facing_error_free_of_internals() -> None:
    saga = saga_in(PS)
    fire_(saga, example("result_failed"))
    assert saga.error is not None and saga.error.code == "model_unavailable"
    assert "gpu on fire" not in saga.error.message


@pytest.mark.parametrize(("trigger", "code"),
                         [("result_failed", "final_failed"), ("timeout", "final_timed_out")])
def test_final_stage_failure_returns_to_selection(trigger: str, code: str) -> None:
    """A final failure or timeout releases the final hold, records error.code, and opens a
    fresh selection window; the sample round stays charged and the samples stay."""
    saga = saga_in(PF, due=trigger == "timeout")
    assert fire_(saga, example(trigger)) is True
    assert saga.state == AS
    assert saga.error is not None and saga.error.code == code
    assert (saga.due_at, saga.due_kind) == (NOW + CFG.selection_window, "selection")
    assert saga.hold is None and saga.job_id is None
    assert saga.credits() == credits("0.00", "0.25", "1.00")
    assert saga.samples == SAMPLES and saga.selected_sample_id is None
    assert REL_F in [describe(i) for i in saga.pending]
    # and the user may choose again
    assert fire_(saga, example("select", sample_id="s1")) is True
    assert saga.state == PF and saga.error is None and saga.attempt == 1


def test_samples_timeout_ends_in_timed_out_and_releases() -> None:
    saga = saga_in(PS, due=True)
    assert fire_(saga, example("timeout")) is True
    assert saga.state == "timed_out"
    assert saga.error is not None and saga.error.code == "timed_out"
    assert saga.credits() == credits("0.00", "0.00", "0.25")


def test_selection_window_ends_in_expired() -> None:
    saga = saga_in(AS, due=True)
    assert fire_(saga, example("timeout")) is True
    assert saga.state == "expired" and saga.due_at is None
    assert saga.credits() == credits("0.00", "0.25", "0.00")


@pytest.mark.parametrize("state", [PS, PF, AS])
def test_timeout_before_due_is_refused_by_the_guard(state: str) -> None:
    """A deadline that has not passed yet does not fire: fire returns False, no change."""
    saga = saga_in(state)
    assert saga.due_at is not None and saga.due_at > NOW
    before = copy.deepcopy(vars(saga))
    assert fire_(saga, example("timeout")) is False
    assert vars(saga) == before


@pytest.mark.parametrize("state", [PS, PF])
def test_pending_retry_is_not_a_deadline(state: str) -> None:
    """A passed retry time fires redispatch, never timeout."""
    saga = saga_in(state, retry_pending=True, due=True)
    before = copy.deepcopy(vars(saga))
    assert fire_(saga, example("timeout")) is False
    assert vars(saga) == before


@pytest.mark.parametrize("state", [PS, PF])
@pytest.mark.parametrize("case", ["retry_not_due", "no_retry_pending"])
def test_redispatch_needs_a_due_retry(state: str, case: str) -> None:
    saga = (saga_in(state, retry_pending=True) if case == "retry_not_due"
            else saga_in(state, due=True))
    before = copy.deepcopy(vars(saga))
    assert fire_(saga, example("redispatch")) is False
    assert vars(saga) == before


@pytest.mark.parametrize("state", [PS, PF])
def test_redispatch_sends_a_new_job_with_a_fresh_deadline(state: str) -> None:
    """Redispatch: new job_id, attempt+1, a stage deadline of its own, the same hold."""
    saga = saga_in(state)
    first_job, hold = saga.job_id, copy.deepcopy(saga.hold)
    fire_(saga, example("result_failed", error=dict(RETRYABLE)))
    saga.take_pending()
    later = NOW + timedelta(seconds=5)
    assert fire_(saga, example("redispatch"), now=later) is True
    assert saga.state == state and saga.attempt == 2
    assert saga.job_id not in (None, first_job)
    deadline = CFG.samples_deadline if state == PS else CFG.final_deadline
    assert (saga.due_at, saga.due_kind) == (later + deadline, "stage")
    assert saga.hold == hold
    (dispatch,) = [i for i in saga.pending if isinstance(i, it.DispatchJob)]
    assert (dispatch.job_id, dispatch.attempt) == (saga.job_id, 2)


@pytest.mark.parametrize(("state", "trigger", "kwargs"), [
    ("requested", "start", {}),
    (AS, "regenerate", {}),
    (AS, "select", {"sample_id": "s1"}),
])
def test_zero_price_is_waived_without_a_hold(state: str, trigger: str,
                                             kwargs: dict[str, Any]) -> None:
    """A stage costing 0.00 on the plan creates no hold: a Waive intent, no Reserve."""
    saga = saga_in(state)
    held_before = saga.held
    assert fire_(saga, example(trigger, price=D("0.00"), **kwargs)) is True
    kinds = [describe(i)[0] for i in saga.pending]
    assert "reserve" not in kinds and "waive" in kinds
    assert saga.hold is None and saga.held == held_before
    assert saga.job_id is not None  # the job is still dispatched


def test_waived_stage_settles_nothing() -> None:
    saga = saga_in(AS)
    fire_(saga, example("select", price=D("0.00")))
    saga.take_pending()
    fire_(saga, example("final_ready"))
    assert not any(isinstance(i, it.Commit | it.Release) for i in saga.pending)
    assert saga.credits() == credits("0.00", "0.25", "0.00")


# ------------------------------------------------------------------ compensation
@pytest.mark.parametrize(("target", "notify", "release"), [
    ("awaiting_selection", "final_failed", REL_F),
    ("failed", "failed", REL_S),
    ("timed_out", "timed_out", REL_S),
    ("cancelled", "cancelled", REL_S),
])
def test_compensation_finishes_where_it_was_headed(target: str, notify: str,
                                                   release: tuple[str, ...]) -> None:
    saga = saga_in(CO, due=True, target=target)
    assert fire_(saga, example("compensated")) is True
    assert saga.state == target and saga.compensation is None
    assert [describe(i) for i in saga.pending] == [
        tr("compensated", CO, target), release, ("notify", notify), sc(CO, target)]
    assert saga.hold is None


@pytest.mark.parametrize("target", ["failed", "timed_out", "cancelled"])
def test_cancel_while_compensating_to_an_end_is_refused(target: str) -> None:
    saga = saga_in(CO, target=target)
    before = copy.deepcopy(vars(saga))
    assert fire_(saga, example("cancel")) is False
    assert vars(saga) == before


def test_cancel_while_compensating_retargets_to_cancelled() -> None:
    saga = saga_in(CO, due=True)
    fire_(saga, example("cancel"))
    assert saga.compensation is not None and saga.compensation.target == "cancelled"
    saga.take_pending()
    assert fire_(saga, example("compensated")) is True
    assert saga.state == "cancelled"
    assert [describe(i) for i in saga.pending][1:3] == [REL_F, ("notify", "cancelled")]


def test_billing_unavailable_keeps_the_hold_and_waits() -> None:
    saga = saga_in(PS)
    fire_(saga, example("billing_unavailable", PS))
    assert saga.hold == SAMPLE_HOLD and saga.job_id is None
    assert saga.due_kind == "compensate" and saga.due_at == NOW + CFG.compensation_delay(1)
    assert saga.compensation == Compensation(target="failed", trigger="result_failed",
                                             error=None, tries=1)


# ------------------------------------------------------------------ pricing
@pytest.mark.parametrize("plan", PLANS)
def test_price_book_per_plan(plan: str) -> None:
    """free pays 0.25 / 1.00 / 2.00; pro, team and enterprise pay only high finals (2.00)."""
    book = PriceBook()
    paying = plan == "free"
    assert book.price(plan, "samples") == (D("0.25") if paying else D("0.00"))
    assert book.price(plan, "final", "standard") == (D("1.00") if paying else D("0.00"))
    assert book.price(plan, "final", "high") == D("2.00")
    assert str(book.price(plan, "samples")) in ("0.25", "0.00")  # two places, never a float
    assert book.quota_applies(plan, "samples") is paying
    assert book.quota_applies(plan, "final") is False


def test_price_book_is_configurable() -> None:
    book = PriceBook(sample_round=D("0.5"), final_standard=D("3"), final_high=D("7.1"))
    assert [str(book.price("free", "samples")), str(book.price("free", "final", "standard")),
            str(book.price("team", "final", "high"))] == ["0.50", "3.00", "7.10"]
    assert PriceBook().free_monthly_sample_rounds == 100


@pytest.mark.parametrize(("size", "resolution", "expected"), [
    ((1080, 1920), "standard", (1152, 2048)),
    ((1200, 630), "high", (4096, 2150)),
    ((1080, 1080), "standard", (2048, 2048)),
    ((1080, 1080), "high", (4096, 4096)),
    ((1600, 900), "standard", (2048, 1152)),
    ((1000, 1500), "high", (2731, 4096)),
    ((1200, 627), "standard", (2048, 1070)),
])
def test_final_output_scales_the_longest_side(size: tuple[int, int], resolution: str,
                                              expected: tuple[int, int]) -> None:
    assert final_output(*size, resolution) == expected  # type: ignore[arg-type]
    saga = saga_in(AS)
    saga.format = {"name": "custom", "width": size[0], "height": size[1]}
    saga.resolution = resolution
    assert saga.final_output() == {"width": expected[0], "height": expected[1], "format": "png"}


# ------------------------------------------------------------------ value types
def test_value_types_keep_the_persisted_json_shape() -> None:
    """Hold, Compensation and SagaError read back what they write, in the stored shape."""
    hold = Hold("h-1", "final", D("2.00"))
    assert hold.to_json() == {"hold_id": "h-1", "stage": "final", "amount": "2.00"}
    assert Hold.from_json(hold.to_json()) == hold
    comp = Compensation("failed", "result_failed", dict(FATAL), 3)
    assert comp.to_json() == {"target": "failed", "trigger": "result_failed",
                              "error": FATAL, "tries": 3}
    assert Compensation.from_json(comp.to_json()) == comp
    error = SagaError("timed_out", "took too long", True)
    assert SagaError.from_json(error.to_json()) == error
