"""Races against PostgreSQL with real threads: row locks, the ledger and idempotency keys must
make every outcome match one serial order (contract sections 1 to 3).

A ``threading.Barrier`` releases all callers at once so the requests really overlap.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any, TypeVar

import pytest
from fastapi.testclient import TestClient
from httpx import Response
from sqlalchemy import func, select

from api.app import ApiDeps, create_app
from persistence.tables import accounts, generations, holds
from saga.commands import ApplyResult, Grant, StartGeneration
from tests.conftest import World

pytestmark = pytest.mark.integration

T = TypeVar("T")
SVC = {"Authorization": "Bearer svc-key"}
GENERATIONS = "/api/v1/generations"
THREADS = 8
FORMAT = {"name": "instagram_post", "width": 1080, "height": 1080}


@pytest.fixture
def client(pg_world: World) -> Iterator[TestClient]:
    app = create_app(ApiDeps(bus=pg_world.bus, queries=pg_world.queries,
                             api_keys={"svc-key": "service", "sup-key": "support"}))
    with TestClient(app) as test_client:
        yield test_client


def race(n: int, call: Callable[[int], T]) -> list[T]:
    """Run ``call(0..n-1)`` on ``n`` threads released together by a barrier."""
    barrier = threading.Barrier(n)

    def run(i: int) -> T:
        barrier.wait(timeout=10)
        return call(i)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(run, range(n)))


def start_body(user_id: str = "u-42") -> dict[str, Any]:
    return {"user_id": user_id, "prompt": "spring sale banner, pastel",
            "format": "instagram_post", "project_id": "p-7", "metadata": {"order": 1}}


def post_start(client: TestClient, user_id: str = "u-42", idem: str | None = None) -> Response:
    return client.post(GENERATIONS, json=start_body(user_id),
                       headers={**SVC, "Idempotency-Key": idem or str(uuid.uuid4())})


def samples() -> list[dict[str, Any]]:
    return [{"sample_id": f"s{i}", "url": f"s3://creativeflow-assets/s{i}.png",
             "width": 512, "height": 512} for i in range(1, 5)]


def awaiting_selection(world: World, user_id: str = "u-42") -> str:
    svc = world
    gen = svc.bus.handle(StartGeneration(user_id=user_id, prompt="p", format=FORMAT))
    (job,) = world.jobs()
    assert svc.bus.handle(ApplyResult("AIGenerationSamplesReady", gen["id"], job["job_id"],
                                        samples=samples())) == "applied"
    return str(gen["id"])


def code(resp: Response) -> str | None:
    if resp.status_code < 400:
        return None
    assert resp.headers["content-type"].startswith("application/problem+json")
    return str(resp.json()["code"])


def account_row(world: World, user_id: str) -> Any:
    with world.engine.connect() as conn:
        return conn.execute(select(accounts).where(accounts.c.user_id == user_id)).one()


def holds_of(world: World, gen_id: str | None = None) -> list[Any]:
    query = select(holds)
    if gen_id is not None:
        query = query.where(holds.c.generation_id == gen_id)
    with world.engine.connect() as conn:
        return list(conn.execute(query))


def count_generations(world: World) -> int:
    with world.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(generations)).scalar_one())


def history(world: World, gen_id: str) -> list[dict[str, Any]]:
    return list(world.queries.history(gen_id)["events"])


# ------------------------------------------------------------------ selection races
@pytest.mark.parametrize("threads", [2, THREADS])
def test_concurrent_selections_one_wins(client: TestClient, pg_world: World,
                                        threads: int) -> None:
    pg_world.bus.handle(Grant("u-42", Decimal("10.00"), "seed"))
    gen_id = awaiting_selection(pg_world)

    def choose(i: int) -> Response:
        sample = f"s{i % 4 + 1}"
        return client.post(f"{GENERATIONS}/{gen_id}/selection",
                           json={"sample_id": sample, "resolution": "standard"},
                           headers={**SVC, "Idempotency-Key": f"sel-{i}"})

    responses = race(threads, choose)
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {202: 1, 409: threads - 1}, [r.text for r in responses]
    assert all(code(r) == "invalid_state" for r in responses if r.status_code == 409)
    (winner,) = [r.json() for r in responses if r.status_code == 202]

    gen = pg_world.queries.get(gen_id)
    assert gen["state"] == "processing_final"
    assert gen["selected_sample_id"] == winner["selected_sample_id"]
    assert gen["credits"] == {"held": "1.00", "charged": "0.25", "released": "0.00"}
    finals = [h for h in holds_of(pg_world, gen_id) if h.stage == "final"]
    assert len(finals) == 1 and finals[0].status == "open"
    jobs = pg_world.jobs()
    assert [(j["stage"], j["selected_sample"]["sample_id"]) for j in jobs] == [
        ("final", winner["selected_sample_id"])]
    row = account_row(pg_world, "u-42")
    assert (row.balance_cents, row.held_cents) == (975, 100)
    transitions = [e["trigger"] for e in history(pg_world, gen_id) if e["kind"] == "transition"]
    assert transitions.count("select") == 1


def test_cancel_racing_selection_matches_a_serial_order(client: TestClient,
                                                        pg_world: World) -> None:
    pg_world.bus.handle(Grant("u-42", Decimal("20.00"), "seed"))
    outcomes = set()
    for _round in range(4):
        gen_id = awaiting_selection(pg_world)

        def call(i: int, gen_id: str = gen_id) -> tuple[str, Response]:
            if i % 2:
                return "cancel", client.post(f"{GENERATIONS}/{gen_id}/cancel", headers=SVC)
            return "select", client.post(f"{GENERATIONS}/{gen_id}/selection",
                                         json={"sample_id": "s1"}, headers=SVC)

        results = race(THREADS, call)
        cancels = [r for kind, r in results if kind == "cancel"]
        selects = [r for kind, r in results if kind == "select"]
        # a cancel always wins exactly once (processing_final is cancellable too) …
        assert sorted(r.status_code for r in cancels) == [200, 409, 409, 409]
        assert all(code(r) == "invalid_state" for r in cancels if r.status_code == 409)
        # … and at most one selection got in before it
        select_ok = [r for r in selects if r.status_code == 202]
        assert len(select_ok) <= 1
        assert all(code(r) == "invalid_state" for r in selects if r.status_code != 202)

        gen = pg_world.queries.get(gen_id)
        assert gen["state"] == "cancelled"
        finals = [h for h in holds_of(pg_world, gen_id) if h.stage == "final"]
        final_jobs = [j for j in pg_world.jobs() if j["stage"] == "final"]
        if select_ok:  # select, then cancel: the final hold was reserved and released
            outcomes.add("select-then-cancel")
            assert [h.status for h in finals] == ["released"]
            assert len(final_jobs) == 1
            assert gen["credits"] == {"held": "0.00", "charged": "0.25", "released": "1.00"}
        else:  # cancel first: nothing was reserved for a final
            outcomes.add("cancel-first")
            assert finals == [] and final_jobs == []
            assert gen["credits"] == {"held": "0.00", "charged": "0.25", "released": "0.00"}
    assert outcomes  # at least one order observed; each one checked for consistency
    assert all(h.status != "open" for h in holds_of(pg_world))
    row = account_row(pg_world, "u-42")
    assert row.held_cents == 0 and row.balance_cents == 2000 - 4 * 25


def test_same_key_selections_replay_the_winner(client: TestClient, pg_world: World) -> None:
    pg_world.bus.handle(Grant("u-42", Decimal("10.00"), "seed"))
    gen_id = awaiting_selection(pg_world)
    responses = race(THREADS, lambda _i: client.post(
        f"{GENERATIONS}/{gen_id}/selection", json={"sample_id": "s3", "resolution": "high"},
        headers={**SVC, "Idempotency-Key": "odoo-select-1"}))
    assert [r.status_code for r in responses] == [202] * THREADS, [r.text for r in responses]
    assert all(r.json() == responses[0].json() for r in responses)
    assert len([h for h in holds_of(pg_world, gen_id) if h.stage == "final"]) == 1
    assert len(pg_world.jobs()) == 1
    assert account_row(pg_world, "u-42").held_cents == 200


# ------------------------------------------------------------------ start races
@pytest.mark.parametrize("balance", ["10.00", "0.25"])
def test_same_idempotency_key_creates_one_generation(client: TestClient, pg_world: World,
                                                     balance: str) -> None:
    pg_world.bus.handle(Grant("u-42", Decimal(balance), "seed"))
    responses = race(THREADS, lambda _i: post_start(client, idem="odoo-order-17"))
    assert [r.status_code for r in responses] == [202] * THREADS, [r.text for r in responses]
    bodies = [r.json() for r in responses]
    assert all(b == bodies[0] for b in bodies)
    assert count_generations(pg_world) == 1
    assert [j["generation_id"] for j in pg_world.jobs()] == [bodies[0]["id"]]
    row = account_row(pg_world, "u-42")
    assert row.held_cents == 25
    assert len(holds_of(pg_world)) == 1


def test_same_key_with_two_bodies_replays_one_and_refuses_the_other(
        client: TestClient, pg_world: World) -> None:
    # Half the callers send another prompt under the same key: whichever body wins, its
    # callers all get its one generation, the others 409 idempotency_key_reused.
    pg_world.bus.handle(Grant("u-42", Decimal("10.00"), "seed"))

    def call(i: int) -> tuple[str, Response]:
        prompt = "first prompt" if i % 2 else "second prompt"
        return prompt, client.post(GENERATIONS, json={**start_body(), "prompt": prompt},
                                   headers={**SVC, "Idempotency-Key": "odoo-order-18"})

    results = race(THREADS, call)
    assert count_generations(pg_world) == 1
    won = [r for _p, r in results if r.status_code == 202]
    winner = won[0].json()["prompt"]
    for prompt, resp in results:
        if prompt == winner:
            assert resp.status_code == 202 and resp.json() == won[0].json(), resp.text
        else:
            assert code(resp) == "idempotency_key_reused", resp.text
    assert len(won) == THREADS // 2
    assert sum("Idempotent-Replayed" not in r.headers for r in won) == 1
    assert [j["generation_id"] for j in pg_world.jobs()] == [won[0].json()["id"]]


def test_same_key_refusals_store_one_answer_and_replay_it(client: TestClient,
                                                          pg_world: World) -> None:
    # No credits: every caller is refused; one refusal is stored under the key (in the same
    # worker thread as the command), every other caller gets it replayed.
    responses = race(THREADS, lambda _i: post_start(client, user_id="u-broke",
                                                    idem="odoo-order-19"))
    assert [code(r) for r in responses] == ["insufficient_credits"] * THREADS
    assert all(r.status_code == 402 and r.json() == responses[0].json() for r in responses)
    assert sum("Idempotent-Replayed" not in r.headers for r in responses) == 1
    assert count_generations(pg_world) == 0 and pg_world.jobs() == []
    again = post_start(client, user_id="u-broke", idem="odoo-order-19")
    assert again.status_code == 402 and again.headers["Idempotent-Replayed"] == "true"


def test_starts_beyond_the_balance_are_refused(client: TestClient, pg_world: World) -> None:
    pg_world.bus.handle(Grant("u-42", Decimal("0.75"), "seed"))
    responses = race(THREADS, lambda _i: post_start(client))
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {202: 3, 402: THREADS - 3}, [r.text for r in responses]
    assert all(code(r) == "insufficient_credits" for r in responses if r.status_code == 402)
    assert count_generations(pg_world) == 3
    assert len(pg_world.jobs()) == 3
    row = account_row(pg_world, "u-42")
    assert (row.balance_cents, row.held_cents) == (75, 75)
    assert row.balance_cents - row.held_cents >= 0
    assert sorted(h.status for h in holds_of(pg_world)) == ["open"] * 3


def test_starts_racing_for_the_last_quota_round(client: TestClient, pg_world: World) -> None:
    svc = pg_world
    svc.bus.handle(Grant("u-42", Decimal("50.00"), "seed"))
    for i in range(99):
        svc.bus.handle(StartGeneration(user_id="u-42", prompt=f"p{i}", format=FORMAT))
    pg_world.jobs()
    responses = race(THREADS, lambda _i: post_start(client))
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {202: 1, 402: THREADS - 1}, [r.text for r in responses]
    assert all(code(r) == "quota_exceeded" for r in responses if r.status_code == 402)
    assert len([h for h in holds_of(pg_world) if h.status == "open"]) == 100


def test_concurrent_grants_to_a_new_account_all_count(client: TestClient,
                                                      pg_world: World) -> None:
    responses = race(THREADS, lambda i: client.post(
        "/api/v1/accounts/u-new/grants", json={"amount": "1.25", "reason": f"g{i}"},
        headers={**SVC, "Idempotency-Key": f"grant-{i}"}))
    assert [r.status_code for r in responses] == [201] * THREADS, [r.text for r in responses]
    assert pg_world.queries.account("u-new") == {
        "user_id": "u-new", "plan": "free", "balance": "10.00", "held": "0.00",
        "available": "10.00"}


def test_same_key_grants_credit_once(client: TestClient, pg_world: World) -> None:
    responses = race(THREADS, lambda _i: client.post(
        "/api/v1/accounts/u-new/grants", json={"amount": "5.00", "reason": "welcome"},
        headers={**SVC, "Idempotency-Key": "grant-welcome"}))
    assert [r.status_code for r in responses] == [201] * THREADS, [r.text for r in responses]
    assert all(r.json() == responses[0].json() for r in responses)
    assert pg_world.queries.account("u-new")["balance"] == "5.00"


# ------------------------------------------------------------------ duplicate results
def test_duplicate_result_deliveries_apply_once(pg_world: World) -> None:
    svc = pg_world
    svc.bus.handle(Grant("u-42", Decimal("10.00"), "seed"))
    gen = svc.bus.handle(StartGeneration(user_id="u-42", prompt="p", format=FORMAT))
    (job,) = pg_world.jobs()
    result = ApplyResult("AIGenerationSamplesReady", gen["id"], job["job_id"],
                         samples=samples(), event_id=str(uuid.uuid4()))

    outcomes = race(THREADS, lambda _i: svc.bus.handle(result))
    assert Counter(outcomes) == {"applied": 1, "duplicate": THREADS - 1}

    view = svc.queries.get(gen["id"])
    assert view["state"] == "awaiting_selection" and len(view["samples"]) == 4
    assert view["credits"] == {"held": "0.00", "charged": "0.25", "released": "0.00"}
    assert svc.queries.account("u-42")["balance"] == "9.75"
    assert svc.queries.account("u-42")["held"] == "0.00"
    events = history(pg_world, gen["id"])
    assert [e["trigger"] for e in events if e["kind"] == "transition"] == [
        "start", "samples_ready"]
    assert [e["detail"]["op"] for e in events if e["kind"] == "credit"] == ["reserve", "commit"]
    rejected = [e for e in events if e["kind"] == "rejected"]
    assert len(rejected) == THREADS - 1
    assert all(e["detail"]["reason"] == "duplicate" for e in rejected)
    assert sum(e["kind"] == "message_in" for e in events) == THREADS
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
