"""The public representations of docs/api.md, rendered from domain objects."""

from __future__ import annotations

from typing import Any

from saga.messages import iso
from saga.model import Generation
from saga.ports import Account, DeadLetter
from saga.pricing import fmt


def generation_view(saga: Generation) -> dict[str, Any]:
    return {
        "id": saga.id,
        "state": saga.state,
        "user_id": saga.user_id,
        "project_id": saga.project_id,
        "prompt": saga.prompt,
        "format": saga.format,
        "sample_count": saga.sample_count,
        "samples": saga.samples,
        "selected_sample_id": saga.selected_sample_id,
        "final_asset": saga.final_asset,
        "credits": saga.credits(),
        "error": saga.error.to_json() if saga.error else None,
        "attempt": saga.attempt,
        "deadline_at": iso(saga.due_at) if saga.due_at and not saga.terminal else None,
        "created_at": iso(saga.created_at),
        "updated_at": iso(saga.updated_at or saga.created_at),
        "metadata": saga.metadata,
        "attention": dict(saga.attention) if saga.attention else None,
    }


def account_view(account: Account) -> dict[str, Any]:
    return {
        "user_id": account.user_id,
        "plan": account.plan,
        "balance": fmt(account.balance),
        "held": fmt(account.held),
        "available": fmt(account.available),
    }


PREVIEW_BYTES = 1024


def body_preview(body: bytes) -> str:
    """At most 1 KB of the body as text (undecodable bytes replaced, control characters
    other than newline and tab shown as U+FFFD)."""
    text = body[:PREVIEW_BYTES].decode("utf-8", errors="replace")
    while len(text.encode()) > PREVIEW_BYTES:  # replacement characters take 3 bytes
        text = text[:-1]
    return "".join(c if c >= " " or c in "\n\t" else "\ufffd" for c in text)


def dead_letter_view(letter: DeadLetter) -> dict[str, Any]:
    return {
        "id": letter.id,
        "dead_lettered_at": iso(letter.dead_lettered_at),
        "reason": letter.reason,
        "exchange": letter.exchange,
        "routing_key": letter.routing_key,
        "generation_id": letter.generation_id,
        "body_preview": body_preview(letter.body),
        "status": letter.status,
        "resolved_at": iso(letter.resolved_at) if letter.resolved_at else None,
        "resolved_by": letter.resolved_by,
        "resolved_reason": letter.resolved_reason,
    }
