"""The generation saga aggregate and its configuration.

Over 300 lines on purpose: every transition callback must be a method of :class:`Generation`
(``transitions`` resolves the machine's callbacks by name on the model), so the aggregate
and its callbacks stay one class; splitting it would only scatter one state machine's steps.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Literal, get_args

from transitions import EventData

from saga import intents as it
from saga import triggers as tg
from saga.errors import UnknownSample
from saga.pricing import ZERO, PriceBook, Stage, final_output, money
from saga.retry import RetryPolicy
from saga.values import Compensation, Hold, SagaError

# What ``due_at`` means: a stage deadline, a retry's time, the selection window, a retry of a
# stuck release.
DueKind = Literal["stage", "retry", "selection", "compensate"]

# name -> (width, height); ``custom`` takes both from the request.
FORMATS: dict[str, tuple[int, int]] = {
    "instagram_post": (1080, 1080),
    "instagram_story": (1080, 1920),
    "instagram_reel": (1080, 1920),
    "facebook_post": (1200, 630),
    "linkedin_post": (1200, 627),
    "twitter_post": (1600, 900),
    "tiktok": (1080, 1920),
    "youtube_thumbnail": (1280, 720),
    "pinterest_pin": (1000, 1500),
}

FormatName = Literal[
    "instagram_post", "instagram_story", "instagram_reel", "facebook_post", "linkedin_post",
    "twitter_post", "tiktok", "youtube_thumbnail", "pinterest_pin", "custom",
]
assert set(get_args(FormatName)) == {*FORMATS, "custom"}, "FormatName and FORMATS disagree"

TERMINAL_STATES = frozenset({"completed", "failed", "timed_out", "cancelled", "expired"})

USER_MESSAGES = {
    "samples_ready": "Your samples are ready. Pick one to continue.",
    "final_ready": "Your final creative is ready.",
    "final_failed": "We could not create the final image and did not charge you for it. "
    "Please choose a sample again.",
    "final_timed_out": "Creating the final image took too long; you were not charged for it. "
    "Please choose a sample again.",
    "failed": "We could not generate samples for this request. You were not charged.",
    "timed_out": "Generating samples took too long. You were not charged.",
    "cancelled": "This generation was cancelled.",
    "expired": "The time to choose a sample has passed.",
}

# Failure codes from n8n whose wording we may show the user; all others get a generic text.
_USER_ERROR_TEXT = {
    "content_policy_violation": "The request was declined by the content policy.",
    "invalid_input": "The request could not be processed as given.",
}
_GENERIC_ERROR_TEXT = "The image service could not complete the request."


@dataclass(frozen=True)
class SagaConfig:
    samples_deadline: timedelta = timedelta(seconds=120)
    final_deadline: timedelta = timedelta(seconds=600)
    selection_window: timedelta = timedelta(hours=24)
    max_attempts: int = 3
    retry_backoff_base: timedelta = timedelta(seconds=1)
    retry_backoff_max: timedelta = timedelta(seconds=30)
    compensation_backoff_base: timedelta = timedelta(seconds=1)
    compensation_backoff_max: timedelta = timedelta(seconds=60)
    # Compensation retries past this many tries park the saga (kind ``compensation``).
    compensation_max_tries: int = 8
    compensation_jitter: float = 0.0  # the settings pass AIGEN_RETRY_JITTER
    # How long (of the service running) a deadline waits for the redelivered result of a
    # commit that was sent to external billing before it parks the saga instead.
    commit_wait: timedelta = timedelta(seconds=120)
    prices: PriceBook = field(default_factory=PriceBook)
    bucket: str = "creativeflow-assets"
    sample_size: int = 512
    allow_http_assets: bool = False  # http:// sample/asset URLs from n8n (else s3/https only)

    def retry_delay(self, attempt: int) -> timedelta:
        """Backoff before dispatch number ``attempt + 1`` (deterministic: no jitter)."""
        return RetryPolicy(self.retry_backoff_base.total_seconds(),
                           self.retry_backoff_max.total_seconds(), jitter=0).delay_td(attempt)

    def compensation_policy(self) -> RetryPolicy:
        return RetryPolicy(self.compensation_backoff_base.total_seconds(),
                           self.compensation_backoff_max.total_seconds(),
                           jitter=self.compensation_jitter,
                           max_attempts=self.compensation_max_tries)

    def compensation_delay(self, tries: int) -> timedelta:
        return self.compensation_policy().delay_td(tries)


def new_id() -> str:
    """A version 7 UUID as text (RFC 9562): 48 bits of Unix time in milliseconds, then the
    version nibble 7, the variant bits ``10`` and 74 random bits from ``os.urandom``.

    Time-ordered, so the indexes keyed by ids (generations, their history, holds, inbox
    keys) take new rows at their right edge, in pages the cache already holds, however many
    rows they keep; random (version 4) ids sent every insert to a random leaf page, which on
    tables of a million generations meant a disk read or several per generation. Spelt
    without the ``UUID`` object, which costs twice as much (a generation takes about a
    dozen ids)."""
    x = (time.time_ns() // 1_000_000).to_bytes(6, "big").hex() + os.urandom(10).hex()
    return f"{x[:8]}-{x[8:12]}-7{x[13:16]}-{_VARIANT[int(x[16], 16) & 3]}{x[17:20]}-{x[20:]}"


_VARIANT = "89ab"  # the RFC 4122 variant: the top two bits of the clock_seq byte are 10


@dataclass(eq=False)
class Generation:
    """One persisted generation saga.

    ``state`` is driven by :data:`saga.machine.MACHINE`; the callbacks below only mutate this
    object and append :mod:`saga.intents` to ``pending`` — they never touch the network.
    ``eq=False`` keeps identity semantics, which the state machine relies on.
    """

    id: str
    user_id: str
    prompt: str
    format: dict[str, Any]
    created_at: datetime
    project_id: str | None = None
    negative_prompt: str | None = None
    style: dict[str, Any] = field(default_factory=dict)
    brand: dict[str, Any] = field(default_factory=dict)
    input_assets: list[str] = field(default_factory=list)
    sample_count: int = 4
    metadata: dict[str, Any] = field(default_factory=dict)
    state: str = "requested"
    samples: list[dict[str, Any]] = field(default_factory=list)
    selected_sample_id: str | None = None
    resolution: str | None = None
    final_asset: dict[str, Any] | None = None
    held: Decimal = ZERO
    charged: Decimal = ZERO
    released: Decimal = ZERO
    error: SagaError | None = None
    stage: Stage | None = None
    attempt: int = 0
    job_id: str | None = None
    hold: Hold | None = None  # the open hold
    round: int = 0  # sample rounds started (regenerations included)
    due_at: datetime | None = None
    due_kind: DueKind | None = None
    compensation: Compensation | None = None
    updated_at: datetime | None = None
    version: int = 0
    history_seq: int = 0
    # Parked for support: {"reason", "since" (iso-8601), "kind"}; kept in columns, not the body.
    attention: dict[str, Any] | None = None
    # W3C traceparent of the transition that armed ``due_at`` (None with tracing off): the
    # span of the fired timer continues that trace. ``traced_due_at`` (transient) is the
    # deadline it belongs to, so a transition that re-arms the timer replaces it.
    due_traceparent: str | None = None
    pending: list[it.Intent] = field(default_factory=list)
    traced_due_at: datetime | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.traced_due_at = self.due_at

    # -- read helpers ---------------------------------------------------------------------
    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def sample(self, sample_id: str) -> dict[str, Any] | None:
        return next((s for s in self.samples if s.get("sample_id") == sample_id), None)

    def credits(self) -> dict[str, str]:
        return {"held": str(money(self.held)), "charged": str(money(self.charged)),
                "released": str(money(self.released))}

    def take_pending(self) -> list[it.Intent]:
        pending, self.pending = self.pending, []
        return pending

    def note(self, actor: it.Actor, detail: dict[str, Any]) -> None:
        self.pending.append(it.HistoryEntry(kind="note", actor=actor, detail=detail))

    def reject(self, actor: it.Actor, reason: str, **detail: Any) -> None:
        self.pending.append(
            it.HistoryEntry(kind="rejected", actor=actor, detail={"reason": reason, **detail})
        )

    # -- machine-level callbacks ----------------------------------------------------------
    def record_transition(self, event: EventData) -> None:
        firing = _firing(event)
        dest = event.transition.dest if event.transition and event.transition.dest else None
        src = event.transition.source if event.transition else self.state
        self.pending.append(
            it.HistoryEntry(
                kind="transition",
                actor=firing.actor,
                trigger=event.event.name if event.event else None,
                from_state=src,
                to_state=dest or src,
                detail=dict(firing.payload.detail),
            )
        )

    def publish_state_change(self, event: EventData) -> None:
        self.updated_at = _firing(event).now
        transition = event.transition
        if transition is not None and transition.dest and transition.dest != transition.source:
            self.pending.append(it.PublishStateChanged(transition.source, transition.dest))
        if self.terminal:
            self.due_at = None
            self.due_kind = None
            self.job_id = None

    # -- conditions -------------------------------------------------------------------------
    def has_sample(self, event: EventData) -> bool:
        sample_id = _firing(event).expect(tg.Select).sample_id
        if self.sample(sample_id) is None:
            raise UnknownSample(f"sample {sample_id!r} was not delivered for this generation",
                                field="sample_id")
        return True

    def may_retry(self, event: EventData) -> bool:
        firing = _firing(event)
        error = firing.expect(tg.ResultFailed).error
        return bool(error.get("retryable")) and self.attempt < firing.config.max_attempts

    def is_due(self, event: EventData) -> bool:
        return self.due_at is not None and self.due_at <= _firing(event).now

    def is_retry_due(self, event: EventData) -> bool:
        return self.due_kind == "retry" and self.is_due(event)

    def is_timeout_due(self, event: EventData) -> bool:
        return self.due_kind in ("stage", "selection") and self.is_due(event)

    def targets_compensation(self, event: EventData) -> bool:
        comp = self.compensation
        return (comp is not None and event.transition is not None
                and comp.target == event.transition.dest)

    def can_cancel_compensation(self, event: EventData) -> bool:
        """Cancel while compensating only when the saga would otherwise live on."""
        return self.compensation is not None and self.compensation.target == "awaiting_selection"

    # -- stage starts ----------------------------------------------------------------------
    def begin_samples_round(self, event: EventData) -> None:
        firing = _firing(event)
        payload = firing.payload
        if not isinstance(payload, tg.Start | tg.Regenerate):
            raise TypeError(f"a samples round cannot start from {type(payload).__name__}")
        if isinstance(payload, tg.Regenerate) and payload.prompt:
            self.prompt = payload.prompt
        self.round += 1
        self.samples = []
        self.selected_sample_id = None
        self.resolution = None
        self.error = None
        self._open_stage("samples", payload.price, firing.config, firing.now)

    def begin_final(self, event: EventData) -> None:
        firing = _firing(event)
        payload = firing.expect(tg.Select)
        self.selected_sample_id = payload.sample_id
        self.resolution = payload.resolution or "standard"
        self.error = None
        self._open_stage("final", payload.price, firing.config, firing.now)

    def _open_stage(self, stage: Stage, price: Decimal, cfg: SagaConfig, now: datetime) -> None:
        self.stage = stage
        self.attempt = 0
        price = money(price)
        if price > ZERO:
            hold_id = new_id()
            self.hold = Hold(hold_id, stage, price)
            self.held += price
            self.pending.append(it.Reserve(hold_id, stage, price))
        else:
            self.hold = None
            self.pending.append(it.Waive(stage))
        self._dispatch(cfg, now)

    def _dispatch(self, cfg: SagaConfig, now: datetime) -> None:
        assert self.stage is not None
        self.attempt += 1
        self.job_id = new_id()
        deadline = cfg.samples_deadline if self.stage == "samples" else cfg.final_deadline
        self.due_at = now + deadline
        self.due_kind = "stage"
        self.pending.append(it.DispatchJob(self.stage, self.job_id, self.attempt))

    def final_output(self) -> dict[str, Any]:
        width, height = final_output(
            int(self.format["width"]), int(self.format["height"]),
            "high" if self.resolution == "high" else "standard",
        )
        return {"width": width, "height": height, "format": "png"}

    # -- results ---------------------------------------------------------------------------
    def accept_samples(self, event: EventData) -> None:
        firing = _firing(event)
        self.samples = list(firing.expect(tg.SamplesReady).samples)
        self._settle(commit=True)
        self._open_selection_window(firing.config, firing.now)
        self._notify("samples_ready", {"samples": self.samples})

    def accept_final(self, event: EventData) -> None:
        self.final_asset = dict(_firing(event).expect(tg.FinalReady).asset)
        self._settle(commit=True)
        self._notify("final_ready", {"asset": self.final_asset})

    def schedule_retry(self, event: EventData) -> None:
        firing = _firing(event)
        self.job_id = None  # anything still arriving for the failed job is stale
        self.due_at = firing.now + firing.config.retry_delay(self.attempt)
        self.due_kind = "retry"
        self.note(firing.actor,
                  {"retry_at": self.due_at.isoformat(), "next_attempt": self.attempt + 1})

    def dispatch_again(self, event: EventData) -> None:
        firing = _firing(event)
        self._dispatch(firing.config, firing.now)

    # -- stage ends ------------------------------------------------------------------------
    def end_samples_failed(self, event: EventData) -> None:
        payload = _firing(event).payload
        error = (payload.error if isinstance(payload, tg.ResultFailed | tg.Compensated)
                 else None) or {}
        code = str(error.get("code") or "generation_failed")
        self.error = SagaError(code, _USER_ERROR_TEXT.get(code, _GENERIC_ERROR_TEXT),
                               bool(error.get("retryable")))
        self._settle(commit=False)
        self._notify("failed", {"error": self.error.to_json()})

    def end_samples_timed_out(self, event: EventData) -> None:
        self.error = SagaError("timed_out", USER_MESSAGES["timed_out"], True)
        self._settle(commit=False)
        self._notify("timed_out", {"error": self.error.to_json()})

    def end_final_failed(self, event: EventData) -> None:
        self.error = SagaError("final_failed", USER_MESSAGES["final_failed"], True)
        self._back_to_selection(event, "final_failed")

    def end_final_timed_out(self, event: EventData) -> None:
        self.error = SagaError("final_timed_out", USER_MESSAGES["final_timed_out"], True)
        self._back_to_selection(event, "final_timed_out")

    def _back_to_selection(self, event: EventData, notification: str) -> None:
        self._settle(commit=False)
        self.selected_sample_id = None
        self.resolution = None
        firing = _firing(event)
        self._open_selection_window(firing.config, firing.now)
        self._notify(notification, {"error": self.error.to_json() if self.error else None})

    def end_expired(self, event: EventData) -> None:
        self._notify("expired", {})

    def end_cancelled(self, event: EventData) -> None:
        self._settle(commit=False)
        self._notify("cancelled", {})

    # -- compensation (external billing not answering) ---------------------------------------
    def begin_compensation(self, event: EventData) -> None:
        firing = _firing(event)
        payload = firing.expect(tg.BillingUnavailable)
        self.compensation = Compensation(payload.target, payload.original_trigger, payload.error)
        self.job_id = None
        self.due_at = firing.now + firing.config.compensation_delay(1)
        self.due_kind = "compensate"

    def retarget_to_cancelled(self, event: EventData) -> None:
        assert self.compensation is not None  # the guard checked it
        self.compensation = replace(self.compensation, target="cancelled", trigger="cancel",
                                    error=None)

    def finish_compensation(self, event: EventData) -> None:
        comp = self.compensation
        assert comp is not None  # the guard checked it
        self.compensation = None
        self.due_at = None
        self.due_kind = None
        ender = _COMPENSATION_ENDERS[comp.target, comp.trigger]
        ender(self, event)

    def _open_selection_window(self, cfg: SagaConfig, now: datetime) -> None:
        self.job_id = None
        self.stage = None
        self.due_at = now + cfg.selection_window
        self.due_kind = "selection"

    # -- shared helpers ----------------------------------------------------------------------
    def _settle(self, *, commit: bool) -> None:
        """Commit or release the open hold (if any) — exactly once, since it is then cleared."""
        hold = self.hold
        if hold is None:
            return
        amount = hold.amount
        self.held -= amount
        if commit:
            self.charged += amount
            self.pending.append(it.Commit(hold.hold_id, hold.stage, amount))
        else:
            self.released += amount
            self.pending.append(it.Release(hold.hold_id, hold.stage, amount))
        self.hold = None

    def _notify(self, type_: str, data: dict[str, Any]) -> None:
        self.pending.append(it.Notify(type_, USER_MESSAGES[type_], data))


def _firing(event: EventData) -> tg.Firing:
    firing = event.kwargs["firing"]
    assert isinstance(firing, tg.Firing)
    return firing


# (target, original trigger) -> the ending callback that compensation finally runs.
_COMPENSATION_ENDERS: dict[tuple[str, str], Callable[[Generation, EventData], None]] = {
    ("failed", "result_failed"): Generation.end_samples_failed,
    ("timed_out", "timeout"): Generation.end_samples_timed_out,
    ("cancelled", "cancel"): Generation.end_cancelled,
    ("awaiting_selection", "result_failed"): Generation.end_final_failed,
    ("awaiting_selection", "timeout"): Generation.end_final_timed_out,
}

