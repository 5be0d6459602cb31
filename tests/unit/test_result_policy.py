"""The result policy's switch: http:// result URLs only where AIGEN_ALLOW_HTTP_ASSETS says so."""

from __future__ import annotations

import pytest

from aigen.settings import Settings
from saga.commands import ApplyResult
from saga.handlers import unsafe_result


def samples_with(url: str, sample_id: str = "s1") -> ApplyResult:
    return ApplyResult("AIGenerationSamplesReady", "g", "j", samples=[
        {"sample_id": "s0", "url": "s3://bucket/s0.png", "width": 1, "height": 1},
        {"sample_id": sample_id, "url": url, "width": 1, "height": 1}])


def test_http_result_urls_follow_the_switch() -> None:
    cmd = samples_with("http://127.0.0.1:8000/assets/s1.png")
    assert unsafe_result(cmd, allow_http=True) is None
    refused = unsafe_result(cmd, allow_http=False)
    assert refused is not None and refused["field"] == "samples.1.url"
    assert "http" in refused["problem"]


@pytest.mark.parametrize("url", ["https://cdn.example.com/a.png", "s3://bucket/key.png"])
def test_safe_result_urls_pass(url: str) -> None:
    assert unsafe_result(samples_with(url), allow_http=False) is None


def test_the_first_unsafe_field_is_named() -> None:
    cmd = samples_with("javascript:x", sample_id="<b>")
    assert unsafe_result(cmd, allow_http=True) == {
        "field": "samples.1.sample_id",
        "problem": "sample_id must be 1 to 64 of the characters A-Z a-z 0-9 . _ -"}
    asset = ApplyResult("AIGenerationFinalAssetReady", "g", "j", asset={
        "url": "https://cdn.example.com/f.png", "width": 1, "height": 1, "format": "svg"})
    assert unsafe_result(asset, allow_http=False) == {
        "field": "asset.format", "problem": "format must be one of jpeg, png, webp"}


def test_http_assets_default_on_only_in_the_embedded_mode(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    for name in ("AIGEN_AMQP_URL", "AIGEN_ALLOW_HTTP_ASSETS", "AIGEN_API_KEYS"):
        monkeypatch.delenv(name, raising=False)
    assert Settings().saga_config().allow_http_assets is True
    broker = Settings(amqp_url="amqp://x", api_keys="service:k")
    assert broker.saga_config().allow_http_assets is False
    assert Settings(amqp_url="amqp://x", api_keys="service:k",
                    allow_http_assets=True).saga_config().allow_http_assets is True
