"""Random command sequences against the real handlers on SQLite (the invariants in docs/api.md).

A hypothesis rule-based state machine grants credits, starts generations for users on
several plans, selects, regenerates, cancels, delivers results for current and stale jobs,
redelivers earlier results and moves the clock. After every step the ledger tables are
checked directly: each hold is settled at most once, accounts never go negative, the journal
sums to the balances, charges match the price book and each saga's credits match its holds.

One hypothesis state machine (rules and invariants share its state), hence one file over 300
lines.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections import Counter, defaultdict
from datetime import timedelta
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from sqlalchemy import select

from persistence.db import make_engine, migrate
from persistence.tables import accounts, generations, holds, journal
from saga.commands import (
    ApplyResult,
    Cancel,
    FireDeadlines,
    Grant,
    Regenerate,
    SelectSample,
    SetPlan,
    StartGeneration,
)
from saga.errors import (
    InsufficientCredits,
    InvalidState,
    NotFound,
    QuotaExceeded,
    UnknownSample,
)
from saga.model import TERMINAL_STATES, SagaConfig
from saga.pricing import PriceBook
from tests.conftest import FakeClock, World

DOMAIN_ERRORS = (InvalidState, UnknownSample, InsufficientCredits, QuotaExceeded, NotFound)
# Hypothesis favours the first element of a sampled_from: keep the most useful one first.
USERS = {"free-a": "free", "pro-a": "pro", "free-b": "free", "team-a": "team"}
OPENING_BALANCE = {"free-a": "5.00", "pro-a": "2.00", "free-b": "0.25", "team-a": "0.00"}
MAX_GENERATIONS = 6  # per example: steer a few sagas deep rather than start many
QUOTA = 3  # small, so random runs reach the free plan's monthly limit
CONFIG = SagaConfig(
    samples_deadline=timedelta(seconds=120),
    final_deadline=timedelta(seconds=600),
    selection_window=timedelta(hours=24),
    max_attempts=3,
    retry_backoff_base=timedelta(seconds=1),
    retry_backoff_max=timedelta(seconds=30),
    prices=PriceBook(free_monthly_sample_rounds=QUOTA),
)
FORMAT = {"name": "facebook_post", "width": 1200, "height": 630}
RESULT_KINDS = ["samples_ready", "final_ready", "failed_retryable", "failed_fatal", "progress"]
REFUSALS = {"duplicate", "stale_job", "wrong_state", "refused_by_guard"}


def cents(amount: str | Decimal) -> int:
    return int(Decimal(amount) * 100)


def make_result(kind: str, gen_id: str, job_id: str, n_samples: int) -> ApplyResult:
    if kind == "samples_ready":
        samples = [{"sample_id": f"s{i}", "url": f"s3://b/s{i}.png", "width": 512,
                    "height": 512} for i in range(1, n_samples + 1)]
        return ApplyResult("AIGenerationSamplesReady", gen_id, job_id, samples=samples)
    if kind == "final_ready":
        return ApplyResult("AIGenerationFinalAssetReady", gen_id, job_id,
                           asset={"url": "s3://b/f.png", "width": 2048, "height": 1075,
                                  "format": "png"})
    if kind == "progress":
        return ApplyResult("AIGenerationProgress", gen_id, job_id, percent=50)
    return ApplyResult("AIGenerationFailed", gen_id, job_id,
                       error={"code": "model_unavailable", "message": "x",
                              "retryable": kind == "failed_retryable"})


class SagaLedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # A fresh database per example: function-scoped fixtures are not reset between
        # hypothesis examples.
        self.tmp = tempfile.mkdtemp(prefix="aigen-prop-")
        url = f"sqlite:///{self.tmp}/aigen.db"
        migrate(url)
        self.engine = make_engine(url, pool_size=2)
        self.world = World(self.engine, FakeClock(), config=CONFIG)
        self.svc = self.world
        self.gens: list[str] = []
        self.jobs: dict[str, list[str]] = defaultdict(list)  # dispatched job ids, in order
        self.delivered: list[ApplyResult] = []
        for user, plan in USERS.items():
            self.svc.bus.handle(SetPlan(user, plan))
            if Decimal(OPENING_BALANCE[user]) > 0:
                self.svc.bus.handle(Grant(user, Decimal(OPENING_BALANCE[user]), "opening"))
        # Every example starts with sagas in each live state, so random steps go deep.
        self.start("free-a")
        self.happy_step(0, "standard")  # -> awaiting_selection
        self.start("free-a")
        self.happy_step(0, "high")  # samples_ready
        self.happy_step(0, "high")  # -> processing_final with a 2.00 hold
        self.start("pro-a")  # -> processing_samples, waived
        assert sorted(self.states().values()) == ["awaiting_selection", "processing_final",
                                                  "processing_samples"]

    def teardown(self) -> None:
        self.engine.dispose()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -------------------------------------------------------------- helpers
    def collect_jobs(self) -> None:
        for job in self.world.jobs():
            assert job["job_id"] not in self.jobs[job["generation_id"]]
            self.jobs[job["generation_id"]].append(job["job_id"])

    def states(self) -> dict[str, str]:
        with self.engine.connect() as conn:
            return {r.id: r.state for r in conn.execute(
                select(generations.c.id, generations.c.state))}

    def pick(self, index: int, *prefer: str) -> str:
        """Generations in a state named in ``prefer`` first, then live ones, then the rest, newest
        first within each group: hypothesis draws index 0 most often."""
        states = self.states()

        def rank(gen_id: str) -> int:
            state = states[gen_id]
            return 0 if state in prefer else 1 if state not in TERMINAL_STATES else 2

        ordered = sorted(self.gens[::-1], key=rank)  # stable: newest first within a rank
        return ordered[index % len(ordered)]

    def steer(self, call: Any, *args: Any) -> None:
        with contextlib.suppress(*DOMAIN_ERRORS):
            call(*args)
        self.collect_jobs()

    def deliver(self, cmd: ApplyResult, *, redelivery: bool) -> None:
        before = self.svc.queries.get(cmd.generation_id)
        outcome = self.svc.bus.handle(cmd)
        self.delivered.append(cmd)
        self.collect_jobs()
        assert outcome == "applied" or outcome in REFUSALS, outcome
        if redelivery and cmd.event_type != "AIGenerationProgress":
            # the dedup key (job_id, event_type) was seen before: never applied twice
            assert outcome == "duplicate"
        if outcome != "applied" or cmd.event_type == "AIGenerationProgress":
            assert self.svc.queries.get(cmd.generation_id) == before, "a refused result changed it"
        if outcome == "applied" and cmd.event_type != "AIGenerationProgress":
            assert cmd.job_id == self.jobs[cmd.generation_id][-1]

    # -------------------------------------------------------------- rules
    @rule(user=st.sampled_from(list(USERS)), amount=st.sampled_from(["0.25", "1.00", "3.50"]))
    def grant(self, user: str, amount: str) -> None:
        self.svc.bus.handle(Grant(user, Decimal(amount), "top-up"))

    @precondition(lambda self: len(self.gens) < MAX_GENERATIONS)
    @rule(user=st.sampled_from(list(USERS)))
    def start(self, user: str) -> None:
        try:
            view = self.svc.bus.handle(StartGeneration(user_id=user, prompt="p", format=FORMAT))
        except DOMAIN_ERRORS:
            self.collect_jobs()
            return
        assert view["state"] == "processing_samples"
        self.gens.append(view["id"])
        self.collect_jobs()

    @precondition(lambda self: self.gens)
    @rule(command=st.sampled_from(["select", "regenerate", "cancel"]), index=st.integers(0, 50),
          sample=st.sampled_from(["s1", "s2", "s4", "s9"]),
          resolution=st.sampled_from(["standard", "high"]), new_prompt=st.booleans())
    def odoo(self, command: str, index: int, sample: str, resolution: str,
             new_prompt: bool) -> None:
        """A steering call from Odoo: select (a delivered sample or not), regenerate, cancel.

        One rule for the three keeps cancel from ending most sagas early."""
        if command == "select":
            gen_id = self.pick(index, "awaiting_selection")
            self.steer(self.svc.bus.handle, SelectSample(gen_id, sample, resolution))
        elif command == "regenerate":
            gen_id = self.pick(index, "awaiting_selection")
            self.steer(self.svc.bus.handle, Regenerate(gen_id, "again" if new_prompt else None))
        else:
            self.steer(self.svc.bus.handle, Cancel(self.pick(index)))

    @precondition(lambda self: self.gens)
    @rule(index=st.integers(0, 50), resolution=st.sampled_from(["standard", "high"]))
    def happy_step(self, index: int, resolution: str) -> None:
        """The next step of the happy path for a live saga: n8n delivers what the current job
        should produce, or the user selects the first sample. Keeps random runs going deep."""
        gen_id = self.pick(index, "processing_samples", "processing_final",
                           "awaiting_selection")
        state = self.states()[gen_id]
        if state == "awaiting_selection":
            self.steer(self.svc.bus.handle, SelectSample(gen_id, "s1", resolution))
            return
        kind = "final_ready" if state == "processing_final" else "samples_ready"
        self.deliver(make_result(kind, gen_id, self.jobs[gen_id][-1], 4), redelivery=False)

    @precondition(lambda self: self.gens)
    @rule(index=st.integers(0, 50), kind=st.sampled_from(RESULT_KINDS),
          stale=st.booleans(), which=st.integers(0, 10), n_samples=st.integers(1, 4))
    def result(self, index: int, kind: str, stale: bool, which: int, n_samples: int) -> None:
        gen_id = self.pick(index, "processing_samples", "processing_final")
        jobs = self.jobs[gen_id]
        if stale and len(jobs) > 1:
            job_id = jobs[which % (len(jobs) - 1)]
        elif stale:
            job_id = f"never-dispatched-{which}"
        else:
            job_id = jobs[-1]
        self.deliver(make_result(kind, gen_id, job_id, n_samples), redelivery=False)

    @precondition(lambda self: self.gens)
    @rule(index=st.integers(0, 50))
    def flaky_job(self, index: int) -> None:
        """n8n reports a retryable failure for the current job and the backoff passes."""
        gen_id = self.pick(index, "processing_samples", "processing_final")
        attempt = self.svc.queries.get(gen_id)["attempt"]
        self.deliver(make_result("failed_retryable", gen_id, self.jobs[gen_id][-1], 4),
                     redelivery=False)
        self.tick(CONFIG.retry_delay(max(attempt, 1)).total_seconds())

    @precondition(lambda self: self.delivered)
    @rule(which=st.integers(0, 100))
    def redeliver(self, which: int) -> None:
        self.deliver(self.delivered[which % len(self.delivered)], redelivery=True)

    @rule(seconds=st.sampled_from([0.5, 1, 2, 4, 30, 121, 601, 86_401]))
    def tick(self, seconds: float) -> None:
        self.world.clock.advance(seconds)
        fired = self.svc.bus.handle(FireDeadlines())
        assert fired < 200, "fire_due kept firing: a due saga that never stops being due"
        assert self.svc.bus.handle(FireDeadlines()) == 0, "a deadline fired twice"
        self.collect_jobs()

    # -------------------------------------------------------------- invariants
    @invariant()
    def ledger_is_consistent(self) -> None:
        with self.engine.connect() as conn:
            hold_rows = list(conn.execute(holds.select()))
            journal_rows = list(conn.execute(journal.select()))
            account_rows = {r.user_id: r for r in conn.execute(accounts.select())}
            saga_rows = {r.id: r for r in conn.execute(generations.select())}
        prices = CONFIG.prices
        steps: dict[str, Counter[str]] = defaultdict(Counter)
        for row in journal_rows:
            if row.hold_id is not None:
                steps[row.hold_id][row.kind] += 1

        open_by_user: Counter[str] = Counter()
        by_saga: dict[str, Counter[str]] = defaultdict(Counter)
        open_per_saga: Counter[str] = Counter()
        rounds: Counter[tuple[str, str]] = Counter()
        for h in hold_rows:
            kinds = steps[h.hold_id]
            # reserved once; committed or released at most once, and the status agrees
            assert kinds["reserve"] == 1, (h.hold_id, kinds)
            assert kinds["commit"] + kinds["release"] <= 1, (h.hold_id, kinds)
            expected_status = ("committed" if kinds["commit"] else
                               "released" if kinds["release"] else "open")
            assert h.status == expected_status, (h.hold_id, h.status, kinds)
            if h.status == "open":
                open_by_user[h.user_id] += h.amount_cents
                open_per_saga[h.generation_id] += 1
            by_saga[h.generation_id][h.status] += h.amount_cents
            if h.stage == "samples" and h.status != "released":
                rounds[h.user_id, h.month] += 1

            # the amount is the price book's price for the stage on the user's plan
            plan = account_rows[h.user_id].plan
            saga = saga_rows[h.generation_id]
            if h.stage == "samples":
                assert h.amount_cents == cents(prices.price(plan, "samples"))
            elif h.status == "committed":
                assert saga.state == "completed"
                assert h.amount_cents == cents(prices.price(plan, "final",
                                                            saga.body["resolution"]))
            else:
                assert h.amount_cents in {cents(prices.price(plan, "final", r))
                                          for r in ("standard", "high")}
            assert h.amount_cents > 0  # a 0.00 stage creates no hold

        for user, acc in account_rows.items():
            assert acc.held_cents == open_by_user[user], user
            assert acc.balance_cents - acc.held_cents >= 0, user
            rows = [r for r in journal_rows if r.user_id == user]
            assert sum(r.balance_delta_cents for r in rows) == acc.balance_cents, user
            assert sum(r.held_delta_cents for r in rows) == acc.held_cents, user

        for (user, month), n in rounds.items():  # the free plan's monthly quota held
            if account_rows[user].plan == "free":
                assert n <= QUOTA, (user, month, n)

        for gen_id, saga in saga_rows.items():
            body = saga.body if isinstance(saga.body, dict) else json.loads(saga.body)
            mine = by_saga[gen_id]
            assert (cents(body["held"]), cents(body["charged"]), cents(body["released"])) == (
                mine["open"], mine["committed"], mine["released"]), (gen_id, saga.state, body)
            assert open_per_saga[gen_id] <= 1
            assert 1 <= body["attempt"] <= CONFIG.max_attempts  # retries are bounded
            if saga.state in TERMINAL_STATES:
                assert mine["open"] == 0, (gen_id, saga.state)
                assert body["hold"] is None and saga.due_at is None
            if body["hold"] is not None:
                assert mine["open"] == cents(body["hold"]["amount"])
            if body["job_id"] is not None:  # the current job was really sent to n8n
                assert body["job_id"] == self.jobs[gen_id][-1]
                assert saga.state in ("processing_samples", "processing_final")


SagaLedgerMachine.TestCase.settings = settings(
    max_examples=50, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestSagaLedgerProperties = SagaLedgerMachine.TestCase
