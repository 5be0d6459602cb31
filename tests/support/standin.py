"""Moved to :mod:`standins.n8n`; re-exported for existing imports."""

from standins.n8n import (
    JOBS_QUEUE,
    Collector,
    Reply,
    ScriptedN8n,
    happy,
    publish_raw,
    result_body,
    wait_for,
)

__all__ = ["JOBS_QUEUE", "Collector", "Reply", "ScriptedN8n", "happy", "publish_raw",
           "result_body", "wait_for"]
