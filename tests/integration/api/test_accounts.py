"""/accounts: balances, plans and grants."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.integration.api.helpers import (
    SUP,
    SVC,
    account,
    assert_invalid,
    assert_problem,
    grant,
    key,
)

pytestmark = pytest.mark.integration


# ------------------------------------------------------------------ accounts
def test_account_get_and_404(client: TestClient) -> None:
    for headers in (SVC, SUP):
        assert_problem(client.get("/api/v1/accounts/ghost", headers=headers), 404, "not_found")
    grant(client, amount="3.5")
    for headers in (SVC, SUP):
        resp = client.get("/api/v1/accounts/u-42", headers=headers)
        assert resp.status_code == 200
        assert resp.json() == {"user_id": "u-42", "plan": "free", "balance": "3.50",
                               "held": "0.00", "available": "3.50"}


def test_put_plan_creates_and_updates(client: TestClient) -> None:
    resp = client.put("/api/v1/accounts/u-new", json={"plan": "team"}, headers=SVC)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"user_id": "u-new", "plan": "team", "balance": "0.00",
                           "held": "0.00", "available": "0.00"}
    grant(client, "u-new", "7.00")
    resp = client.put("/api/v1/accounts/u-new", json={"plan": "enterprise"}, headers=SVC)
    assert resp.status_code == 200
    assert resp.json()["plan"] == "enterprise" and resp.json()["balance"] == "7.00"
    assert account(client, "u-new")["plan"] == "enterprise"


@pytest.mark.parametrize(("payload", "field"), [
    ({"plan": "gold"}, "plan"),
    ({"plan": None}, "plan"),
    ({}, "plan"),
    ({"plan": "pro", "tier": 1}, "tier"),
])
def test_put_plan_refusals(client: TestClient, payload: Any, field: str) -> None:
    resp = client.put("/api/v1/accounts/u-42", json=payload, headers=SVC)
    assert_invalid(resp, field)
    assert_problem(client.get("/api/v1/accounts/u-42", headers=SVC), 404, "not_found")


def test_grant_creates_a_free_account(client: TestClient) -> None:
    resp = client.post("/api/v1/accounts/u-9/grants", json={"amount": "10.5", "reason": "promo"},
                       headers={**SVC, **key()})
    assert resp.status_code == 201, resp.text
    data = resp.json()
    assert {k: data[k] for k in ("user_id", "plan", "balance", "held", "available")} == {
        "user_id": "u-9", "plan": "free", "balance": "10.50", "held": "0.00",
        "available": "10.50"}
    grant(client, "u-9", "0.01")
    assert account(client, "u-9")["balance"] == "10.51"
    # a grant keeps the plan of an existing account
    client.put("/api/v1/accounts/u-9", json={"plan": "pro"}, headers=SVC)
    assert grant(client, "u-9", "1.00")["plan"] == "pro"


@pytest.mark.parametrize(("payload", "field"), [
    ({"amount": 10, "reason": "r"}, "amount"),
    ({"amount": 10.5, "reason": "r"}, "amount"),
    ({"amount": "-1.00", "reason": "r"}, "amount"),
    ({"amount": "0.00", "reason": "r"}, "amount"),
    ({"amount": "0", "reason": "r"}, "amount"),
    ({"amount": "1.005", "reason": "r"}, "amount"),
    ({"amount": "1e3", "reason": "r"}, "amount"),
    ({"amount": "ten", "reason": "r"}, "amount"),
    ({"amount": "1.00"}, "reason"),
    ({"amount": "1.00", "reason": ""}, "reason"),
    ({"reason": "r"}, "amount"),
])
def test_grant_refusals(client: TestClient, payload: Any, field: str) -> None:
    resp = client.post("/api/v1/accounts/u-42/grants", json=payload, headers=SVC)
    assert_invalid(resp, field)
    assert_problem(client.get("/api/v1/accounts/u-42", headers=SVC), 404, "not_found")


def test_account_paths_check_the_user_id(client: TestClient) -> None:
    long_id = "u" * 65
    assert_invalid(client.put(f"/api/v1/accounts/{long_id}", json={"plan": "pro"},
                              headers=SVC), "user_id")
    assert_invalid(client.post(f"/api/v1/accounts/{long_id}/grants",
                               json={"amount": "1.00", "reason": "r"}, headers=SVC), "user_id")
