"""Domain errors. Each carries a machine-readable ``code``; the API maps codes to statuses."""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """A request the saga refuses. ``code`` is part of the public contract."""

    code = "domain_error"

    def __init__(self, message: str, *, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.extra = extra


class NotFound(DomainError):
    code = "not_found"


class InvalidState(DomainError):
    code = "invalid_state"


class CommitInFlight(InvalidState):
    """A step would release a hold whose commit was already sent to external billing (our
    transaction that settled it was lost, e.g. to a crash). Billing may have committed it, so
    it is never released: the result that sent the commit is redelivered and completes the
    saga. A cancel is refused with ``invalid_state`` meanwhile; a deadline waits for it."""

    def __init__(self, hold_ids: list[str], *, state: str) -> None:
        super().__init__(f"a commit of hold {', '.join(hold_ids)} was sent to billing and its "
                         "result is still being applied", state=state)
        self.hold_ids = hold_ids


class UnknownSample(DomainError):
    code = "unknown_sample"


class InsufficientCredits(DomainError):
    code = "insufficient_credits"


class QuotaExceeded(DomainError):
    code = "quota_exceeded"


class InvalidRequest(DomainError):
    """Semantically invalid input the schema could not catch (e.g. an unknown plan)."""

    code = "validation_error"


class ConcurrencyConflict(Exception):
    """Someone else changed the saga between our read and our write; the caller retries."""


class BillingUnavailable(Exception):
    """The external billing backend did not answer; the step is retried later."""


class BillingRefused(Exception):
    """The billing backend answered with a refusal retrying will not change (a 4xx that is
    not a conflict we can resolve): the step is not retried, the saga is parked."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class UnloadableSaga(Exception):
    """A saga row exists but cannot be loaded into a ``Generation`` (a corrupt body).

    ``state``, ``user_id`` and ``attention`` are what the row's own columns still say, when
    the loader read them (the API answers with them: :class:`GenerationUnreadable`)."""

    def __init__(self, generation_id: str, cause: str, *, state: str | None = None,
                 user_id: str | None = None,
                 attention: dict[str, Any] | None = None) -> None:
        super().__init__(f"generation {generation_id} cannot be loaded: {cause}")
        self.generation_id = generation_id
        self.state = state
        self.user_id = user_id
        self.attention = attention


class GenerationUnreadable(DomainError):
    """A request about a generation whose stored row cannot be loaded: 409, with the row's
    ``generation_id``, ``state`` and ``attention`` (``null`` until something parked it)."""

    code = "generation_unreadable"

    @classmethod
    def of(cls, exc: UnloadableSaga) -> GenerationUnreadable:
        return cls(f"generation {exc.generation_id} is stored but cannot be read; support "
                   "has to repair it (it is parked once the service tries to use it)",
                   generation_id=exc.generation_id, state=exc.state,
                   attention=exc.attention)
