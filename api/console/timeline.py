"""A saga's history as sentences a person reads ("10:02:03 held 0.25 for the samples round")."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

_STAGE = {"samples": "the samples round", "final": "the final"}
_CREDIT = {"reserve": "held", "commit": "charged", "release": "released"}
_IN = {
    "AIGenerationSamplesReady": "delivered {samples} samples",
    "AIGenerationFinalAssetReady": "delivered the final asset",
    "AIGenerationProgress": "reported progress {percent}%",
    "AIGenerationFailed": "reported a failure",
}


_SUPPORT_NOTES = {
    "resolve": "recorded that billing {outcome} hold {hold_id}",
    "replay_dead_letter": "replayed a dead letter",
    "discard_dead_letter": "discarded a dead letter",
}


@dataclass(frozen=True)
class Line:
    time: str  # HH:MM:SS (UTC)
    at: str  # the full timestamp
    kind: str
    actor: str
    text: str
    raw: str  # the event as JSON, for the "raw" disclosure

    @property
    def refused(self) -> bool:
        return self.kind == "rejected"


def _state(name: Any) -> str:
    return str(name).replace("_", " ")


def describe(event: dict[str, Any]) -> str:
    kind = event.get("kind")
    actor = str(event.get("actor", "system"))
    detail: dict[str, Any] = event.get("detail") or {}
    who = "" if actor == "system" else f"{actor} "
    if kind == "transition":
        trigger = str(event.get("trigger") or "")
        source, dest = event.get("from_state"), event.get("to_state")
        moved = (f"{_state(source)} → {_state(dest)}" if source != dest
                 else f"stays in {_state(source)}")
        text = f"{who}{trigger.replace('_', ' ')}: {moved}"
        if detail.get("reason"):
            text += f" (reason: {detail['reason']})"
        if isinstance(detail.get("error"), dict):
            error = detail["error"]
            text += f" — error {error.get('code', '')}: {error.get('message', '')}"
        return text
    if kind == "credit":
        op = str(detail.get("op", ""))
        stage = _STAGE.get(str(detail.get("stage")), str(detail.get("stage", "")))
        if op == "waived":
            return f"{stage} costs nothing on this plan (waived)"
        return f"{_CREDIT.get(op, op)} {detail.get('amount', '?')} for {stage}"
    if kind == "message_in":
        template = _IN.get(str(detail.get("event_type")), "sent {event_type}")
        try:
            text = template.format(**{"samples": "?", "percent": "?", "event_type": "?",
                                      **detail})
        except (KeyError, IndexError, ValueError):
            text = f"sent {detail.get('event_type')}"
        if isinstance(detail.get("error"), dict):
            text += f": {detail['error'].get('code', '')} {detail['error'].get('message', '')}"
        return f"{who}{text}".strip()
    if kind == "message_out":
        event_type = detail.get("event_type")
        if event_type == "AIGenerationJobRequested":
            return (f"asked n8n for {_STAGE.get(str(detail.get('stage')), 'a job')} "
                    f"(attempt {detail.get('attempt', 1)})")
        if event_type == "GenerationNotification":
            return f"notified the user: {str(detail.get('type', '')).replace('_', ' ')}"
        if event_type == "GenerationStateChanged":
            return f"told Odoo: {detail.get('routing_key', 'state changed')}"
        return f"sent {event_type} to {detail.get('routing_key', '?')}"
    if kind == "rejected":
        what = detail.get("trigger") or detail.get("event_type") or "a message"
        reason = detail.get("reason", "refused")
        message = f" — {detail['message']}" if detail.get("message") else ""
        return f"refused {who}{str(what).replace('_', ' ')}: {reason}{message}"
    if kind == "note":
        action = detail.get("action")
        if action in _SUPPORT_NOTES:
            text = _SUPPORT_NOTES[str(action)].format(**{"outcome": "?", "hold_id": "?",
                                                         **detail})
            return f"{who}{text} (reason: {detail.get('reason', '')})"
        if detail.get("dead_lettered"):
            return f"a message for it was dead-lettered: {detail.get('reason', '')}"
        if detail.get("reason"):
            return f"{who}note: {detail['reason']}"
        return f"{who}note: " + ", ".join(f"{k} {v}" for k, v in detail.items())
    return f"{who}{kind}"


def timeline(events: list[dict[str, Any]]) -> list[Line]:
    lines = []
    for event in events:
        at = str(event.get("at", ""))
        try:
            clock = datetime.fromisoformat(at.replace("Z", "+00:00")).strftime("%H:%M:%S")
        except ValueError:
            clock = at
        lines.append(Line(clock, at, str(event.get("kind")), str(event.get("actor")),
                          describe(event), json.dumps(event, indent=2, sort_keys=True)))
    return lines
