"""Presigned download links for s3:// assets (api/asset_links.py), against moto's S3 server.

moto serves the objects but does not check query-string signatures, so the signature itself
is checked two other ways: against AWS's published presigned-URL example, and byte for byte
against botocore's own S3 client (``generate_presigned_url``) at the same instant.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
from collections.abc import Iterator
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import httpx
import pytest
from botocore.config import Config
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import Engine, MetaData, select

from aigen.bootstrap import asset_links
from aigen.settings import Settings, describe_error
from api.app import ApiDeps, create_app
from api.asset_links import S3ExtraMissing, S3LinkConfig, S3Links
from api.console import data
from saga.commands import ApplyResult, Grant
from tests.conftest import World
from tests.n8n_support.s3 import S3Stub

BUCKET = "creativeflow-assets"
KEYS = {"svc-key": "service", "sup-key": "support"}
SVC = {"Authorization": "Bearer svc-key"}
SUP = {"Authorization": "Bearer sup-key"}
TTL = 900
START = {"user_id": "u-1", "prompt": "spring sale", "format": "instagram_post"}
SIGNATURE = re.compile(r"X-Amz-Signature=[0-9a-f]{64}")


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Stub]:
    with S3Stub(bucket=BUCKET) as stub:
        yield stub


def links_for(s3: S3Stub, **overrides: Any) -> S3Links:
    config = {"endpoint_url": s3.endpoint, "region": s3.region,
              "access_key_id": s3.access_key_id, "secret_access_key": s3.secret_access_key,
              "ttl_s": TTL, "bucket": BUCKET, **overrides}
    return S3Links(S3LinkConfig(**config))


def put(s3: S3Stub, key: str, content: bytes) -> str:
    s3.client().put_object(Bucket=BUCKET, Key=key, Body=content)
    return f"s3://{BUCKET}/{key}"


# ------------------------------------------------------------------ the links themselves
@pytest.mark.parametrize("key", [
    "users/u-1/generations/g-1/samples/s1.png",
    "users/u 1/spaced name.png",
    "users/ü/plus+and~tilde.png",
    "users/x/100%.png",
])
def test_a_presigned_link_fetches_the_object_from_s3(s3: S3Stub, key: str) -> None:
    content = f"bytes of {key}".encode()
    link = links_for(s3).presign(put(s3, key, content))
    assert link is not None and link.startswith(f"{s3.endpoint}/{BUCKET}/")
    response = httpx.get(link)  # a browser's GET: no credentials, no headers
    assert response.status_code == 200 and response.content == content
    query = parse_qs(urlsplit(link).query)
    assert query["X-Amz-Expires"] == [str(TTL)]
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert query["X-Amz-Credential"][0].startswith(f"{s3.access_key_id}/")
    assert query["X-Amz-Credential"][0].endswith(f"/{s3.region}/s3/aws4_request")


def test_a_link_to_a_missing_key_is_not_the_object(s3: S3Stub) -> None:
    link = links_for(s3).presign(f"s3://{BUCKET}/no/such/key.png")
    assert link is not None and httpx.get(link).status_code == 404


@pytest.fixture
def frozen(monkeypatch: pytest.MonkeyPatch) -> dt.datetime:
    import botocore.auth
    at = dt.datetime(2013, 5, 24, 0, 0, 0)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: at)
    return at


def test_the_signature_matches_aws_published_example(frozen: dt.datetime) -> None:
    """AWS's documented example of a presigned GET (SigV4 query-string authentication)."""
    links = S3Links(S3LinkConfig(
        endpoint_url="https://s3.amazonaws.com", region="us-east-1",
        access_key_id="AKIAIOSFODNN7EXAMPLE",
        secret_access_key="wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        ttl_s=86400, bucket="examplebucket", addressing_style="virtual"))
    assert links.presign("s3://examplebucket/test.txt") == (
        "https://examplebucket.s3.amazonaws.com/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request"
        "&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host"
        "&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404")


@pytest.mark.parametrize("style", ["path", "virtual"])
@pytest.mark.parametrize("key", ["a/b.png", "users/u 1/spaced name.png", "ü/+~%.png"])
def test_links_are_what_botocores_s3_client_presigns(frozen: dt.datetime, style: str,
                                                     key: str) -> None:
    endpoint, region = "https://minio.example.com:9443", "eu-central-1"
    client = boto3.client("s3", endpoint_url=endpoint, region_name=region,
                          aws_access_key_id="AK", aws_secret_access_key="SK",
                          config=Config(signature_version="s3v4",
                                        s3={"addressing_style": style}))
    expected = client.generate_presigned_url("get_object", Params={"Bucket": BUCKET,
                                                                   "Key": key}, ExpiresIn=TTL)
    links = S3Links(S3LinkConfig(endpoint_url=endpoint, region=region, access_key_id="AK",
                                 secret_access_key="SK", ttl_s=TTL, bucket=BUCKET,
                                 addressing_style=style))  # type: ignore[arg-type]
    assert links.presign(f"s3://{BUCKET}/{key}") == expected


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8000/assets/g/s1.png",  # the demo worker's: already browser-readable
    "https://cdn.example.com/a.png",
    "s3://other-bucket/a.png",  # only the configured bucket gets links
    f"s3://{BUCKET}",
    f"s3://{BUCKET}/",
    None, 42,
])
def test_only_s3_urls_of_the_configured_bucket_get_a_link(url: object) -> None:
    links = S3Links(S3LinkConfig("http://127.0.0.1:9000", "us-east-1", "AK", "SK", TTL,
                                 BUCKET))
    assert links.presign(url) is None


def test_adding_links_changes_a_copy_never_the_view() -> None:
    links = S3Links(S3LinkConfig("http://127.0.0.1:9000", "us-east-1", "AK", "SK", TTL,
                                 BUCKET))
    view = {"id": "g", "samples": [{"sample_id": "s1", "url": f"s3://{BUCKET}/k/s1.png"},
                                   {"sample_id": "s2", "url": "http://x/s2.png"}],
            "final_asset": {"url": f"s3://{BUCKET}/k/final.png", "format": "png"}}
    before = json.dumps(view, sort_keys=True)
    out = links.add_to(view)
    assert json.dumps(view, sort_keys=True) == before
    assert out["samples"][0]["download_url"].startswith(f"http://127.0.0.1:9000/{BUCKET}/k/")
    assert out["samples"][0]["url"] == f"s3://{BUCKET}/k/s1.png"
    assert "download_url" not in out["samples"][1]
    assert out["final_asset"]["download_url"].startswith(
        f"http://127.0.0.1:9000/{BUCKET}/k/final.png?")
    assert links.add_to({"id": "g", "samples": [], "final_asset": None})["final_asset"] is None


def test_without_botocore_making_links_is_a_clear_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "botocore.auth", None)
    with pytest.raises(S3ExtraMissing, match=r"aigen-orchestrator\[s3\]"):
        S3Links(S3LinkConfig("http://127.0.0.1:9000", "us-east-1", "AK", "SK", TTL, BUCKET))


# ------------------------------------------------------------------ settings
S3_ENV = {"AIGEN_S3_ENDPOINT_URL": "https://minio.example.com/",
          "AIGEN_S3_ACCESS_KEY_ID": "AK", "AIGEN_S3_SECRET_ACCESS_KEY": "SK"}


def settings(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Settings:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


def refusal(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> str:
    with pytest.raises(ValidationError) as caught:
        settings(monkeypatch, env)
    return describe_error(caught.value)


def test_unset_s3_settings_make_no_links(monkeypatch: pytest.MonkeyPatch) -> None:
    assert asset_links(settings(monkeypatch, {})) is None


def test_s3_settings_make_links_for_the_storage_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    links = asset_links(settings(monkeypatch, {**S3_ENV, "AIGEN_S3_PRESIGN_TTL_S": "60",
                                               "AIGEN_S3_REGION": "eu-west-1",
                                               "AIGEN_STORAGE_BUCKET": "assets-x"}))
    assert links is not None
    link = links.presign("s3://assets-x/a.png")
    assert link is not None and link.startswith("https://minio.example.com/assets-x/a.png?")
    assert "X-Amz-Expires=60&" in link and "%2Feu-west-1%2F" in link
    assert "SK" not in repr(Settings())  # the secret is never printed


@pytest.mark.parametrize(("env", "message"), [
    ({"AIGEN_S3_ENDPOINT_URL": "https://minio.example.com"},
     "AIGEN_S3_ENDPOINT_URL is set: AIGEN_S3_ACCESS_KEY_ID and AIGEN_S3_SECRET_ACCESS_KEY "
     "must be set too"),
    ({"AIGEN_S3_ACCESS_KEY_ID": "AK"},
     "AIGEN_S3_ACCESS_KEY_ID set without AIGEN_S3_ENDPOINT_URL"),
    ({**S3_ENV, "AIGEN_S3_ENDPOINT_URL": "minio:9000"},
     "AIGEN_S3_ENDPOINT_URL: expected an http:// or https:// base URL with no path"),
    ({**S3_ENV, "AIGEN_S3_ENDPOINT_URL": "https://minio.example.com/bucket"},
     "AIGEN_S3_ENDPOINT_URL: expected an http:// or https:// base URL with no path"),
    ({**S3_ENV, "AIGEN_S3_PRESIGN_TTL_S": "604801"}, "AIGEN_S3_PRESIGN_TTL_S: "),
    ({**S3_ENV, "AIGEN_S3_ADDRESSING_STYLE": "dns"}, "AIGEN_S3_ADDRESSING_STYLE: "),
])
def test_incomplete_s3_settings_are_one_line_errors(monkeypatch: pytest.MonkeyPatch,
                                                    env: dict[str, str], message: str) -> None:
    assert message in refusal(monkeypatch, env)


def test_s3_settings_without_botocore_are_refused_at_start(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "botocore" else real(name, *a))
    assert "pip install 'aigen-orchestrator[s3]'" in refusal(monkeypatch, S3_ENV)


# ------------------------------------------------------------------ reads through the API
def completed(world: World, client: TestClient, s3: S3Stub) -> tuple[str, dict[str, bytes]]:
    """A generation with s3 samples and an s3 final, as a real n8n would report them."""
    world.bus.handle(Grant("u-1", Decimal("10.00"), "welcome"))
    start = client.post("/api/v1/generations", json=START,
                        headers={**SVC, "Idempotency-Key": "k-start"})
    gid = start.json()["id"]
    (job,) = world.jobs()
    prefix = job["storage"]["prefix"]
    stored: dict[str, bytes] = {}
    samples = []
    for i in (1, 2):
        url = put(s3, f"{prefix}s{i}.png", f"sample {i} of {gid}".encode())
        stored[url] = f"sample {i} of {gid}".encode()
        samples.append({"sample_id": f"s{i}", "url": url, "width": 512, "height": 512})
    assert world.bus.handle(ApplyResult("AIGenerationSamplesReady", gid, job["job_id"],
                                        samples=samples)) == "applied"
    chosen = client.post(f"/api/v1/generations/{gid}/selection", json={"sample_id": "s2"},
                         headers={**SVC, "Idempotency-Key": "k-select"})
    assert chosen.status_code == 202
    (final_job,) = world.jobs()
    final_url = put(s3, f"{prefix}final.png", b"the final")
    stored[final_url] = b"the final"
    asset = {"url": final_url, "width": 2048, "height": 2048, "format": "png"}
    assert world.bus.handle(ApplyResult("AIGenerationFinalAssetReady", gid,
                                        final_job["job_id"], asset=asset)) == "applied"
    return gid, stored


def app_client(world: World, links: S3Links | None) -> TestClient:
    return TestClient(create_app(ApiDeps(bus=world.bus, queries=world.queries,
                                         api_keys=KEYS, asset_links=links)))


def test_reads_carry_download_urls_that_fetch_the_assets(world: World, s3: S3Stub) -> None:
    with app_client(world, links_for(s3)) as client:
        gid, stored = completed(world, client, s3)
        one = client.get(f"/api/v1/generations/{gid}", headers=SUP).json()
        (listed,) = client.get("/api/v1/generations", headers=SUP).json()["items"]
    for view in (one, listed):
        assets = [*view["samples"], view["final_asset"]]
        assert [a["url"] for a in assets] == list(stored)  # url: exactly what n8n reported
        for asset in assets:
            response = httpx.get(asset["download_url"])
            assert response.status_code == 200 and response.content == stored[asset["url"]]


def test_without_s3_settings_reads_have_no_download_url(world: World, s3: S3Stub) -> None:
    with app_client(world, None) as client:
        gid, _stored = completed(world, client, s3)
        one = client.get(f"/api/v1/generations/{gid}", headers=SVC).json()
        page = client.get("/api/v1/generations", headers=SUP).json()
    assert "download_url" not in json.dumps([one, page])
    assert one["final_asset"]["url"].startswith("s3://")


def everything_stored(engine: Engine) -> str:
    meta = MetaData()
    meta.reflect(engine)
    with engine.connect() as conn:
        return json.dumps([[list(map(str, row)) for row in conn.execute(select(table))]
                           for table in meta.sorted_tables])


def test_links_are_never_stored_replayed_or_sent(world: World, s3: S3Stub) -> None:
    with app_client(world, links_for(s3)) as client:
        gid, _stored = completed(world, client, s3)
        read = client.get(f"/api/v1/generations/{gid}", headers=SUP).json()
        assert "download_url" in read["final_asset"]
        client.get("/api/v1/generations", headers=SUP)
        replayed = client.post(f"/api/v1/generations/{gid}/selection",
                               json={"sample_id": "s2"},
                               headers={**SVC, "Idempotency-Key": "k-select"})
        history = client.get(f"/api/v1/generations/{gid}/history", headers=SUP)
    assert replayed.headers.get("Idempotent-Replayed") == "true"
    for text in (replayed.text, history.text, everything_stored(world.engine),
                 json.dumps([m.body for m in world.broker.published], default=str)):
        assert "download_url" not in text and not SIGNATURE.search(text)
        assert "X-Amz-" not in text
    assert f"s3://{BUCKET}/" in everything_stored(world.engine)  # the urls are stored, as sent


# ------------------------------------------------------------------ the console
def console_page(client: TestClient, gid: str) -> str:
    form = client.get("/console/sign-in").text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', form)
    assert csrf is not None
    signed = client.post("/console/sign-in", data={"csrf_token": csrf.group(1),
                                                    "api_key": "sup-key"},
                         follow_redirects=False)
    assert signed.status_code == 303
    page = client.get(f"/console/generations/{gid}")
    assert page.status_code == 200
    return page.text


def test_the_console_shows_s3_images_through_their_links(world: World, s3: S3Stub) -> None:
    links = links_for(s3)
    with app_client(world, links) as client:
        gid, stored = completed(world, client, s3)
        view = data.generation(world.queries, gid, links)
        assert all("download_url" in a for a in [*view["samples"], view["final_asset"]])
        html = console_page(client, gid)
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert len(sources) == 3
    for src in sources:
        link = src.replace("&amp;", "&")
        assert link.startswith(f"{s3.endpoint}/{BUCKET}/") and SIGNATURE.search(link)
        assert httpx.get(link).content in stored.values()
    assert all(url in html for url in stored)  # the s3:// location is still shown as text


def test_the_console_without_links_shows_s3_urls_as_text(world: World, s3: S3Stub) -> None:
    with app_client(world, None) as client:
        gid, stored = completed(world, client, s3)
        assert "download_url" not in json.dumps(data.generation(world.queries, gid))
        html = console_page(client, gid)
    assert "<img " not in html  # a browser cannot show s3:// ...
    assert all(f'<p class="mono url">{url}</p>' in html for url in stored)  # ... so: text
