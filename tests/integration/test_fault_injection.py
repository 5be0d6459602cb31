"""The fault-injection run (bench/fault_injection.py) at a reduced size, in CI."""

from __future__ import annotations

import pytest

from bench.fault_injection import format_report, run

pytestmark = pytest.mark.integration


def test_fault_injection_keeps_every_promise(pg_url: str, amqp_vhost: str) -> None:
    # pg_url / amqp_vhost make the run skip locally (and fail in CI) without the servers.
    report = run(generations=80, kills=5, seed=5, verbose=False, poison=True)
    text = format_report(report)
    print(text)
    assert "healthy sagas stalled 0;" in text
    assert report["poisoned"] == 3 and report["poisoned_unparked"] == []
    assert sum(report["parked"].values()) >= 3
    # Billing refuses two users' commits for good: their sagas park with that reason, keep
    # their holds (open at billing and in our mirror), and no commit of theirs goes through.
    assert len(report["refusing_users"]) == 2 and report["commits_refused"] >= 1
    assert report["parked_for_refusal"] >= 1 and report["refusal_errors"] == []
    assert any("billing refused to commit" in reason for reason in report["parked"])
    assert report["held_for_parked"] >= report["parked_for_refusal"]
    assert report["kills"] == 5
    assert report["open_holds"] == 0 and report["doubled_settlements"] == []
    assert report["balance_errors"] == [] and report["journal_mismatch"] == []
    assert report["outbox_unsent"] == 0 and report["lost"] == []
    assert report["not_settled"] == []
    assert report["dead_lettered"] >= report["garbage_sent"] > 0
    assert report["ok"]
