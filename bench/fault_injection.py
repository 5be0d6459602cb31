"""Fault-injection run: hundreds of generations while everything goes wrong.

Through real PostgreSQL and RabbitMQ, one ``aigen serve`` process is SIGKILLed at random
moments (``--kills`` times) and restarted, while a scripted n8n randomly delays, fails
(retryable or not), duplicates, drops (so deadlines fire), answers late and sends garbage.
Odoo's part is played over REST with retries and Idempotency-Keys, as Odoo would. At the end
it checks and prints the invariants of docs/api.md (credits):

* every generation is terminal, or in ``awaiting_selection`` with nothing held;
* every hold was committed or released exactly once; no hold is open;
* each account's balance equals its grants minus its charges (and the journal agrees);
* the outbox is fully sent;
* results sent / received / applied / refused / dead-lettered, lost 0, doubled 0.

With ``--poison`` (the CI run) it also feeds poison: saga rows whose body no longer loads
(corrupted in the database, due at once), results nested 1,200 levels deep, and a billing
backend that permanently refuses some commits. For the last, the service runs against the
external billing stand-in (``standins/billing.py``, an HTTP server on loopback in a thread of
this script, so it outlives every SIGKILL) instead of its built-in ledger; accounts are opened
there, and two designated users' commits are answered 422 for good. Each poisoned saga must be
parked (``attention``) instead of retried forever — a designated user's saga with the
billing-refused reason as soon as a commit is due, and no commit of theirs may succeed. The
report adds the parked sagas by reason, ``healthy sagas stalled N`` (must be 0: a healthy
saga whose deadline stayed passed for more than 30 s, or that ended parked or unsettled) and
the worst lateness of a healthy deadline seen while the run went on (SIGKILL restarts
included).

A parked saga keeps its hold (docs/architecture.md, parking), so with poison the credit
invariants read: every hold of a saga that is not parked was committed or released exactly
once; every hold still open — at billing and in our mirror alike — belongs to a parked saga,
at most one per saga; billing's available credits equal grants - commits - those open holds;
our mirror of each hold agrees with billing's, no ``pending`` row is left (the reaper,
``AIGEN_BILLING_PENDING_GRACE_S`` shortened for the run, releases those a SIGKILL left), and
each committed hold has exactly one ``credit`` commit entry in its saga's history (the
external backend keeps the journal, so this is what "the journal agrees" means there).

Run: ``python -m bench.fault_injection --generations 300 --kills 6``. Exit status 0 only if
every check holds. ``tests/integration/test_fault_injection.py`` runs it at a reduced size.
One scenario that runs top to bottom (service, chaos, checks, report), hence its length.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
import pika
from sqlalchemy import func, select, text

from bench.backends import DEFAULT_AMQP_HOST, DEFAULT_PG, free_port, scratch_backends, wait_ready
from persistence.db import make_engine
from persistence.tables import (
    accounts,
    dead_letters,
    generation_events,
    generations,
    holds,
    journal,
    outbox,
)
from standins.billing import BillingStandIn
from standins.n8n import Reply, ScriptedN8n

KEYS = "service:fi-svc,support:fi-sup"
SERVICE = {"Authorization": "Bearer fi-svc"}
SUPPORT = {"Authorization": "Bearer fi-sup"}
TERMINAL = {"completed", "failed", "timed_out", "cancelled", "expired"}
DEEP = b'{"a":' * 1200 + b"1" + b"}" * 1200  # 2.4 KB nested 1,200 levels deep
STALL_S = 30.0  # a healthy deadline passed for longer than this counts as stalled
GARBAGE = [b"\x00\x01 not json", b'{"event_type": "AIGenerationSamplesReady"}', b"[]",
           b'{"event_type": "AIGenerationFailed", "generation_id": 1, "job_id": 2}']


@dataclass
class Chaos:
    """The scripted n8n's dice. Records what it sent so nothing can go missing unnoticed."""

    rng: random.Random
    deadline: float
    sent_results: set[tuple[str, str]] = field(default_factory=set)  # (job_id, event_type)
    garbage: int = 0
    poison: bool = False
    job_generation: dict[str, str] = field(default_factory=dict)  # job_id -> generation_id
    plan: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def script(self, job: dict[str, Any]) -> list[Reply]:
        with self.lock:
            roll = self.rng.random()
            delay = self.rng.random() * 0.4
            ok = "samples_ready" if job["stage"] == "samples" else "final_ready"
            if roll < 0.45:
                kind, replies = "ok", [Reply(ok, delay)]
            elif roll < 0.55:
                kind, replies = "duplicate", [Reply(ok, delay), Reply(ok, delay + 0.05),
                                              Reply(ok, delay + 0.3)]
            elif roll < 0.68:
                kind, replies = "retryable", [Reply("failed", delay, retryable=True)]
            elif roll < 0.74:
                kind, replies = "final_failure", [Reply("failed", delay, retryable=False,
                                                        code="content_policy_violation")]
            elif roll < 0.82:
                kind, replies = "dropped", []
            elif roll < 0.88:
                kind, replies = "late", [Reply(ok, self.deadline + 1.5)]
            elif roll < 0.94:
                raw = self.rng.choice(GARBAGE)
                if self.poison and self.rng.random() < 0.5:
                    raw = DEEP
                    self.plan["deep_nested"] += 1
                kind, replies = "garbage", [Reply("garbage", 0, raw=raw), Reply(ok, delay)]
                self.garbage += 1
            else:
                kind, replies = "progress", [Reply("progress", 0), Reply(ok, delay + 0.1)]
            self.plan[kind] += 1
            event = {"samples_ready": "AIGenerationSamplesReady",
                     "final_ready": "AIGenerationFinalAssetReady",
                     "failed": "AIGenerationFailed"}
            self.job_generation[job["job_id"]] = job["generation_id"]
            for reply in replies:
                if reply.kind in event:
                    self.sent_results.add((job["job_id"], event[reply.kind]))
            return replies


class Service:
    """One ``aigen serve`` process that can be killed and brought back on the same port."""

    def __init__(self, env: dict[str, str], port: int, log_path: str) -> None:
        self.env = {**os.environ, **env, "AIGEN_HTTP_PORT": str(port)}
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen([sys.executable, "-m", "aigen.cli", "serve"],
                                     env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait_ready(self.base)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.kills += 1

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def call(client: httpx.Client, method: str, url: str, *, patience: float = 60,
         **kw: Any) -> httpx.Response:
    """Odoo's retry loop: the same request (and Idempotency-Key) until the service answers."""
    deadline = time.monotonic() + patience
    while True:
        try:
            response = client.request(method, url, **kw)
            if response.status_code < 500:
                return response
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{method} {url} got no answer for {patience}s")
        time.sleep(0.2)


def run(generations: int = 300, kills: int = 6, seed: int = 11, deadline: float = 3.0,
        pg: str = DEFAULT_PG, amqp_host: str = DEFAULT_AMQP_HOST,
        verbose: bool = True, poison: bool = False) -> dict[str, Any]:
    rng = random.Random(seed)
    tag = uuid.uuid4().hex[:6]
    stack = ExitStack()
    db_url, amqp = stack.enter_context(scratch_backends("fi", pg, amqp_host))
    env = {"AIGEN_DATABASE_URL": db_url, "AIGEN_AMQP_URL": amqp, "AIGEN_API_KEYS": KEYS,
           "AIGEN_LOG_LEVEL": "WARNING", "AIGEN_SAMPLES_DEADLINE_S": str(deadline),
           "AIGEN_FINAL_DEADLINE_S": str(deadline), "AIGEN_SELECTION_WINDOW_S": "6",
           "AIGEN_RETRY_BACKOFF_S": "0.2", "AIGEN_RETRY_BACKOFF_MAX_S": "1",
           "AIGEN_SWEEPER_INTERVAL_S": "0.2", "AIGEN_RETRY_BASE_S": "0.2",
           "AIGEN_RETRY_MAX_S": "2"}
    billing: BillingStandIn | None = None
    if poison:
        billing = stack.enter_context(BillingStandIn(seed=seed))
        # A reservation takes milliseconds on loopback: a 3 s grace is still far above the
        # 1 s timeout, and lets the reaper release what a SIGKILL left pending within the run.
        env.update({"AIGEN_BILLING_URL": billing.url, "AIGEN_BILLING_TIMEOUT_S": "1",
                    "AIGEN_BILLING_PENDING_GRACE_S": "3"})
    # The OS picks the port: a port drawn from the seeded generator was the same for every
    # run with that seed, so two runs on one machine talked to each other's service. The
    # draw stays, so the seeded scenario (what n8n does to which job) is unchanged.
    rng.randrange(200)
    port = free_port()
    service = Service(env, port, f"/tmp/aigen-fi-{tag}.log")
    chaos = Chaos(random.Random(seed + 1), deadline, poison=poison)
    poisoned: list[str] = []
    watch = Lateness(engine_url=db_url, poisoned=poisoned)
    engine = make_engine(db_url)
    say = print if verbose else (lambda *a, **k: None)
    try:
        service.start()
        client = httpx.Client(base_url=service.base, headers=SERVICE, timeout=10)
        users = [f"fi-{i}" for i in range(max(5, generations // 10))]
        granted: Counter[str] = Counter()
        for i, user in enumerate(users):
            plan = "pro" if i % 4 == 3 else "free"
            amount = Decimal(rng.choice(["3.00", "10.00", "50.00"]))
            if billing is not None:  # the external backend owns accounts (PUT/grants: 409)
                billing.open_account(user, plan, str(amount))
            else:
                if plan == "pro":
                    call(client, "PUT", f"/api/v1/accounts/{user}", json={"plan": "pro"})
                r = call(client, "POST", f"/api/v1/accounts/{user}/grants",
                         headers={"Idempotency-Key": f"grant-{user}"},
                         json={"amount": str(amount), "reason": "fault injection"})
                assert r.status_code == 201, r.text
            granted[user] += int(amount * 100)
        if billing is not None:
            billing.refuse_commits_for.update(users[1::max(1, len(users) // 2)][:2])

        stop_killing = threading.Event()

        def killer() -> None:
            for _ in range(kills):
                if stop_killing.wait(rng.uniform(1.0, 4.0)):
                    return
                service.kill()
                say(f"  SIGKILL #{service.kills} (pid {service.proc.pid if service.proc else '?'})"
                    "; restarting")
                service.start()

        ids: list[str] = []
        refused = Counter[str]()
        with ScriptedN8n(amqp, chaos.script):
            killer_thread = threading.Thread(target=killer, daemon=True)
            killer_thread.start()
            watch.start()
            for i in range(generations):
                if poison and i in (2, generations // 3, generations // 2) and ids:
                    poisoned.append(corrupt(engine, ids[-1]))
                r = call(client, "POST", "/api/v1/generations",
                         headers={"Idempotency-Key": f"gen-{tag}-{i}"},
                         json={"user_id": rng.choice(users), "prompt": f"creative {i}",
                               "format": rng.choice(["instagram_post", "tiktok",
                                                     "twitter_post"])})
                if r.status_code == 202:
                    ids.append(r.json()["id"])
                else:
                    refused[r.json().get("code", str(r.status_code))] += 1
                if i % 10 == 0:
                    steer(client, refused)
            # Keep steering until the killer is done and everything has settled.
            settle_deadline = time.monotonic() + 120 + generations * 0.2
            while time.monotonic() < settle_deadline:
                steer(client, refused)
                if not killer_thread.is_alive() and settled(engine):
                    break
                time.sleep(0.5)
            stop_killing.set()
            killer_thread.join()
            # Quiet period: late and duplicate results still in flight get refused.
            time.sleep(deadline + 3)
            wait_until(lambda: settled(engine) and dlq_depth(amqp) == 0, 60)
            watch.stop()
        report = check(engine, amqp, chaos, granted, ids, service.kills, refused, poisoned,
                       watch, billing)
        say(format_report(report))
        return report
    finally:
        service.stop()
        engine.dispose()
        stack.close()


def steer(client: httpx.Client, refused: Counter[str]) -> None:
    """Play Odoo: choose, regenerate or cancel generations waiting for a choice."""
    try:
        waiting = client.get("/api/v1/generations", headers=SUPPORT,
                             params={"state": "awaiting_selection", "limit": 100}).json()["items"]
    except (httpx.HTTPError, ValueError, KeyError):
        return  # the service is down right now; try again later
    for gen in waiting:
        # One decision per generation and round, so a retried request repeats the same body
        # under the same Idempotency-Key, as Odoo's retries would.
        key_text = f"steer-{gen['id']}-{gen['updated_at']}"
        choice = random.Random(key_text)
        roll = choice.random()
        key = {"Idempotency-Key": key_text}
        if roll < 0.1:
            continue  # let the selection window expire
        try:
            if roll < 0.75:
                r = client.post(f"/api/v1/generations/{gen['id']}/selection", headers=key,
                                json={"sample_id": choice.choice(gen["samples"])["sample_id"],
                                      "resolution": choice.choice(["standard", "high"])})
            elif roll < 0.9:
                r = client.post(f"/api/v1/generations/{gen['id']}/regenerate", headers=key)
            else:
                r = client.post(f"/api/v1/generations/{gen['id']}/cancel", headers=key)
        except httpx.HTTPError:
            return
        if r.status_code >= 400:
            refused[r.json().get("code", str(r.status_code))] += 1


def corrupt(engine: Any, generation_id: str) -> str:
    """Poison one saga: its body no longer loads into a Generation, and it is due at once."""
    with engine.begin() as conn:
        conn.execute(text("UPDATE generations SET body = '{\"poisoned\": true}'::jsonb, "
                          "due_at = now(), version = version + 1 WHERE id = :id"),
                     {"id": generation_id})
    return generation_id


class Lateness:
    """Samples, every 0.25 s, how long healthy sagas' passed deadlines have waited."""

    def __init__(self, engine_url: str, poisoned: list[str]) -> None:
        self.engine = make_engine(engine_url, pool_size=1)
        self.poisoned = poisoned
        self.worst = 0.0
        self.stalled: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            try:
                with self.engine.connect() as conn:
                    rows = conn.execute(text(
                        "SELECT id, extract(epoch FROM now() - due_at) AS late FROM generations"
                        " WHERE due_at < now() AND attention_since IS NULL")).all()
            except Exception:  # a missed sample is fine; the next one comes in 0.25 s
                continue
            for row in rows:
                if row.id in self.poisoned:
                    continue
                self.worst = max(self.worst, float(row.late))
                if float(row.late) > STALL_S:
                    self.stalled.add(row.id)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.engine.dispose()


def settled(engine: Any) -> bool:
    """Nothing left to do: every saga that is not parked is at rest, the outbox is sent and
    no external hold is left ``pending`` (the reaper has released what a SIGKILL left)."""
    with engine.connect() as conn:
        busy = conn.execute(select(func.count()).select_from(generations).where(
            generations.c.state.notin_(TERMINAL | {"awaiting_selection"}),
            generations.c.attention_since.is_(None))).scalar_one()
        unsent = conn.execute(select(func.count()).select_from(outbox)
                              .where(outbox.c.sent_at.is_(None))).scalar_one()
        pending = conn.execute(select(func.count()).select_from(holds)
                               .where(holds.c.status == "pending")).scalar_one()
    return bool(busy == 0 and unsent == 0 and pending == 0)


def dlq_depth(amqp: str) -> int:
    """Messages still in the dead-letter queue (the service drains them into its store)."""
    conn = pika.BlockingConnection(pika.URLParameters(amqp))
    try:
        return int(conn.channel().queue_declare("orchestrator.generation.results.dlq",
                                                passive=True).method.message_count)
    finally:
        conn.close()


def wait_until(predicate: Any, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and not predicate():
        time.sleep(0.5)


REFUSED_COMMIT = "billing refused to commit"  # the reason a refused commit parks with


def reason_key(kind: str, reason: str) -> str:
    """A parked saga's reason without the ids in it: ``kind: class: message up to an id``."""
    words = []
    for word in reason.replace(":", " :").split():
        if any(c.isdigit() for c in word):
            break
        words.append(word)
    return f"{kind}: " + " ".join(words).replace(" :", ":").strip(": ")


def check(engine: Any, amqp: str, chaos: Chaos, granted: Counter[str], ids: list[str],
          kills: int, refused: Counter[str], poisoned: list[str] | None = None,
          watch: Lateness | None = None, billing: BillingStandIn | None = None
          ) -> dict[str, Any]:
    poisoned = poisoned or []
    refusing = billing.refuse_commits_for if billing is not None else set()
    with engine.connect() as conn:
        parked_rows = conn.execute(select(generations.c.id, generations.c.user_id,
                                          generations.c.attention_kind,
                                          generations.c.attention_reason)
                                   .where(generations.c.attention_since.is_not(None))).all()
        parked = Counter(reason_key(str(r.attention_kind), str(r.attention_reason))
                         for r in parked_rows)
        parked_ids = {r.id for r in parked_rows}
        # Parked by design: the corrupted rows, and designated users' sagas whose commit
        # billing refused for good. Any other parked saga is a healthy saga stalled.
        refused_parked = {r.id for r in parked_rows if r.user_id in refusing
                          and REFUSED_COMMIT in str(r.attention_reason)}
        meant_to_park = set(poisoned) | refused_parked
        states = Counter(dict(conn.execute(select(generations.c.state, func.count())
                                           .group_by(generations.c.state)).all()))
        waiting_with_hold = [r.id for r in conn.execute(select(generations)) if
                             r.id not in meant_to_park and (
                                 (r.state not in TERMINAL and r.state != "awaiting_selection")
                                 or r.body.get("hold"))]
        mirror = {r.hold_id: r for r in conn.execute(select(
            holds.c.hold_id, holds.c.user_id, holds.c.generation_id, holds.c.status,
            holds.c.amount_cents))}
        hold_status = Counter(r.status for r in mirror.values())
        # A parked saga keeps its hold: an open hold is allowed only as a parked saga's one
        # hold; anything else still open or pending is a hold nobody will settle.
        open_by_saga = Counter(r.generation_id for r in mirror.values() if r.status == "open")
        unsettled = sorted(h for h, r in mirror.items() if r.status == "pending" or (
            r.status == "open" and (r.generation_id not in parked_ids
                                    or open_by_saga[r.generation_id] > 1)))
        held_for_parked = {h: r for h, r in mirror.items()
                           if r.status == "open" and h not in unsettled}
        unsent = conn.execute(select(func.count()).select_from(outbox)
                              .where(outbox.c.sent_at.is_(None))).scalar_one()
        received = conn.execute(select(generation_events.c.detail).where(
            generation_events.c.kind == "message_in")).scalars().all()
        rejected = Counter(d["reason"] for d in conn.execute(
            select(generation_events.c.detail).where(generation_events.c.kind == "rejected",
                                                     generation_events.c.actor == "n8n")
        ).scalars())
        applied = conn.execute(select(func.count()).select_from(generation_events).where(
            generation_events.c.kind == "transition",
            generation_events.c.actor == "n8n")).scalar_one()
        stored_letters = conn.execute(select(dead_letters.c.body).where(
            dead_letters.c.reason.not_like("unroutable%"))).scalars().all()
        if billing is None:
            ledger = check_ledger(conn, granted, held_for_parked)
        else:
            ledger = check_billing(conn, billing, granted, mirror)
    seen = {(d["job_id"], d["event_type"]) for d in received}
    # A result is accounted for once it was received or kept in the dead letters (a poisoned
    # saga's results, and the one whose commit billing refused, are dead-lettered).
    lost = sorted(chaos.sent_results - seen - dead_lettered_results(stored_letters))
    healthy_parked = sorted(parked_ids - meant_to_park)
    stalled = sorted(set(watch.stalled if watch else ()) | set(healthy_parked)
                     | set(waiting_with_hold))
    poisoned_unparked = sorted(set(poisoned) - parked_ids)
    dead = len(stored_letters) + dlq_depth(amqp)
    ok = (not waiting_with_hold and not unsettled and not ledger["doubled"]
          and not ledger["balance_errors"] and not ledger["journal_mismatch"] and unsent == 0
          and not lost and kills >= 1 and dead >= chaos.garbage
          and len(ids) == sum(states.values()) and not stalled and not poisoned_unparked
          and not ledger["refusal_errors"])
    return {
        "ok": ok, "generations": len(ids), "refused_requests": dict(refused), "kills": kills,
        "states": dict(states), "not_settled": waiting_with_hold, "holds": dict(hold_status),
        "open_holds": len(unsettled), "held_for_parked": len(held_for_parked),
        "doubled_settlements": ledger["doubled"], "balance_errors": ledger["balance_errors"],
        "journal_mismatch": ledger["journal_mismatch"], "ledger": ledger["name"],
        "outbox_unsent": unsent, "n8n_plan": dict(chaos.plan),
        "results_sent": len(chaos.sent_results), "results_received": len(received),
        "results_applied": applied, "results_refused": dict(rejected),
        "garbage_sent": chaos.garbage, "dead_lettered": dead, "lost": lost,
        "poisoned": len(poisoned), "poisoned_unparked": poisoned_unparked,
        "parked": dict(parked), "healthy_stalled": stalled,
        "worst_lateness_s": round(watch.worst, 2) if watch else None,
        "refusing_users": sorted(refusing), "commits_refused": billing.refused if billing else 0,
        "parked_for_refusal": len(refused_parked), "refusal_errors": ledger["refusal_errors"],
    }


def dead_lettered_results(bodies: list[bytes]) -> set[tuple[str, str]]:
    """(job_id, event_type) of every stored dead letter that parses as a result."""
    out = set()
    for body in bodies:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            continue
        if isinstance(data, dict) and isinstance(data.get("job_id"), str):
            out.add((data["job_id"], str(data.get("event_type"))))
    return out


def check_ledger(conn: Any, granted: Counter[str], held_for_parked: dict[str, Any]
                 ) -> dict[str, Any]:
    """The built-in ledger: each hold settled once in the journal; balance = grants +
    commits (negative); held = the parked sagas' open holds; the journal sums to both."""
    settlements = conn.execute(select(journal.c.hold_id, func.count()).where(
        journal.c.kind.in_(("commit", "release"))).group_by(journal.c.hold_id)).all()
    doubled = [h for h, n in settlements if n != 1]
    charges = dict(conn.execute(select(journal.c.user_id, func.sum(journal.c.balance_delta_cents))
                                .where(journal.c.kind == "commit")
                                .group_by(journal.c.user_id)).all())
    held = Counter[str]()
    for r in held_for_parked.values():
        held[r.user_id] += r.amount_cents
    balance_errors = []
    for row in conn.execute(select(accounts)):
        expected = granted[row.user_id] + int(charges.get(row.user_id, 0))
        if row.balance_cents != expected or row.held_cents != held[row.user_id]:
            balance_errors.append((row.user_id, row.balance_cents, expected, row.held_cents))
    journal_mismatch = [r[0] for r in conn.execute(text(
        "SELECT a.user_id FROM accounts a JOIN (SELECT user_id, sum(balance_delta_cents) b,"
        " sum(held_delta_cents) h FROM journal GROUP BY user_id) j USING (user_id)"
        " WHERE a.balance_cents <> j.b OR a.held_cents <> j.h")).all()]
    return {"name": "built-in ledger", "doubled": doubled, "balance_errors": balance_errors,
            "journal_mismatch": journal_mismatch, "refusal_errors": []}


def check_billing(conn: Any, billing: BillingStandIn, granted: Counter[str],
                  mirror: dict[str, Any]) -> dict[str, Any]:
    """The external backend keeps the accounts and the journal; we keep a mirror of each hold
    and the sagas' history. Each remote hold moved open -> committed|released at most once
    (billing counts any conflicting call as a violation); available = grants - commits -
    open holds; our mirror says what billing says; and each hold a saga reserved has exactly
    one commit or release in its history iff it is settled, the one matching billing's."""
    cents = {h: int(r["amount"] * 100) for h, r in billing.holds.items()}
    settles = Counter(h for h, status in billing.transitions if status != "open")
    doubled = sorted({h for h, n in settles.items() if n != 1} | set(billing.violations))
    spent = Counter[str]()
    for hold_id, remote in billing.holds.items():
        if remote["status"] != "released":
            spent[remote["user_id"]] += cents[hold_id]
    balance_errors = []
    for user, account in billing.accounts.items():
        available = int(account["available"] * 100)
        if available != granted[user] - spent[user]:
            balance_errors.append((user, available, granted[user] - spent[user], 0))
    mismatch = []
    for hold_id, remote in billing.holds.items():
        local = mirror.get(hold_id)
        if local is None or local.status != remote["status"]:
            mismatch.append(f"{hold_id}: billing {remote['status']}, "
                            f"ours {local.status if local else 'missing'}")
    for hold_id, local in mirror.items():
        if hold_id not in billing.holds and local.status != "released":
            mismatch.append(f"{hold_id}: billing never held it, ours {local.status}")
    credits: dict[str, list[str]] = {}
    for d in conn.execute(select(generation_events.c.detail).where(
            generation_events.c.kind == "credit")).scalars():
        if d.get("hold_id"):
            credits.setdefault(d["hold_id"], []).append(d["op"])
    for hold_id, ops in credits.items():
        settled_as = [op for op in ops if op in ("commit", "release")]
        status = mirror[hold_id].status if hold_id in mirror else "missing"
        want = {"committed": ["commit"], "released": ["release"], "open": []}.get(status)
        if ops.count("reserve") != 1 or settled_as != want:
            mismatch.append(f"{hold_id}: history {ops}, ours {status}")
    for hold_id, local in mirror.items():
        if hold_id not in credits and local.status != "released":
            mismatch.append(f"{hold_id}: {local.status} without a reservation in its history")
    refusal_errors = [f"{h}: commit of a refusing user succeeded"
                      for h, r in billing.holds.items()
                      if r["user_id"] in billing.refuse_commits_for
                      and r["status"] == "committed"]
    if billing.refuse_commits_for and billing.refused == 0:
        refusal_errors.append("no commit was refused: the refusal was never exercised")
    return {"name": "external billing stand-in", "doubled": doubled,
            "balance_errors": balance_errors, "journal_mismatch": mismatch,
            "refusal_errors": refusal_errors}


def format_report(r: dict[str, Any]) -> str:
    lines = [
        f"fault injection: {r['generations']} generations, {r['kills']} SIGKILLs of aigen serve",
        f"  n8n behaviour per job: {json.dumps(r['n8n_plan'], sort_keys=True)}",
        f"  final states: {json.dumps(r['states'], sort_keys=True)}",
        f"  refused requests (Odoo): {json.dumps(r['refused_requests'], sort_keys=True)}",
        f"  credits ({r['ledger']}): holds {json.dumps(r['holds'], sort_keys=True)}; "
        f"open {r['open_holds']} (besides {r['held_for_parked']} kept by parked sagas); "
        f"settled more than once {len(r['doubled_settlements'])}",
        f"  balances != grants - charges: {len(r['balance_errors'])}; journal mismatches: "
        f"{len(r['journal_mismatch'])}; outbox unsent: {r['outbox_unsent']}",
        f"  results: sent {r['results_sent']} distinct, received {r['results_received']} "
        f"(redeliveries included), applied {r['results_applied']}, refused "
        f"{json.dumps(r['results_refused'], sort_keys=True)}",
        f"  garbage sent {r['garbage_sent']}, dead-lettered {r['dead_lettered']}",
        f"  lost {len(r['lost'])}, doubled {len(r['doubled_settlements'])}, generations not "
        f"settled {len(r['not_settled'])}",
        f"  poison: {r['poisoned']} saga rows corrupted, not parked "
        f"{len(r['poisoned_unparked'])}; parked (by reason): "
        f"{json.dumps(r['parked'], sort_keys=True)}",
        f"  billing refusing commits for {len(r['refusing_users'])} users: "
        f"{r['commits_refused']} commits refused, {r['parked_for_refusal']} sagas parked for it"
        f", errors {len(r['refusal_errors'])}",
        f"  healthy sagas stalled {len(r['healthy_stalled'])}; worst lateness of a healthy "
        f"deadline {r['worst_lateness_s']} s",
        f"  RESULT: {'OK' if r['ok'] else 'FAILED'}",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generations", type=int, default=300)
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--deadline", type=float, default=3.0)
    parser.add_argument("--poison", action="store_true",
                        help="also corrupt saga rows, send deeply nested results and run "
                        "against an external billing stand-in that permanently refuses "
                        "some users' commits")
    args = parser.parse_args()
    report = run(args.generations, args.kills, args.seed, args.deadline, poison=args.poison)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
