"""Presigned download links for ``s3://`` asset URLs, added when a generation is read.

A real n8n reports samples and final assets as ``s3://bucket/key`` URLs into MinIO (S3),
which no browser can open. When the S3 settings are configured (``AIGEN_S3_*``, see the
README), every read of a generation (``GET /api/v1/generations/{id}``, the list, the
console's generation page) gets a ``download_url`` next to each such ``url``: an S3 SigV4
query-signed ``https://`` (or ``http://`` for a local MinIO) link valid for
``AIGEN_S3_PRESIGN_TTL_S`` seconds. The links are made on the copy that is rendered and are
never stored: the saga row, its history, idempotent replays and messages keep exactly what
the worker reported.

Signing is botocore's (``S3SigV4QueryAuth``, the signer behind ``generate_presigned_url``),
used directly rather than through an S3 client: it is offline (an HMAC over the URL, no
network call) and several times cheaper per link, which matters on a list page of up to 500
assets. botocore is the optional extra ``s3``; it is imported only when links are
configured.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote, urlsplit

from api.threads import blocking

S3_EXTRA_HINT = "pip install 'aigen-orchestrator[s3]'"
AddressingStyle = Literal["path", "virtual"]


def botocore_installed() -> bool:
    return importlib.util.find_spec("botocore") is not None


class S3ExtraMissing(RuntimeError):
    """The S3 settings are set but botocore (the ``s3`` extra) is not installed."""


@dataclass(frozen=True)
class S3LinkConfig:
    """Where browsers reach the bucket and how links are signed.

    ``endpoint_url`` is the base URL *browsers* reach (scheme, host, optional port, no
    path); ``bucket`` is the only bucket links are made for (the one jobs are told to write
    to), so a worker naming another bucket cannot obtain a link into it.
    """

    endpoint_url: str
    region: str
    access_key_id: str
    secret_access_key: str
    ttl_s: int
    bucket: str
    addressing_style: AddressingStyle = "path"


class S3Links:
    """Makes presigned GET links for ``s3://<bucket>/<key>`` URLs of one bucket."""

    def __init__(self, config: S3LinkConfig) -> None:
        try:
            from botocore.auth import S3SigV4QueryAuth
            from botocore.awsrequest import AWSRequest
            from botocore.credentials import ReadOnlyCredentials
        except ImportError as exc:
            raise S3ExtraMissing("AIGEN_S3_ENDPOINT_URL is set but botocore is not "
                                 f"installed: {S3_EXTRA_HINT}") from exc
        self.config = config
        self._auth_cls = S3SigV4QueryAuth
        self._request_cls = AWSRequest
        self._credentials = ReadOnlyCredentials(config.access_key_id,
                                                config.secret_access_key, None)
        endpoint = urlsplit(config.endpoint_url)
        self._scheme, self._netloc = endpoint.scheme, endpoint.netloc

    def object_url(self, key: str) -> str:
        """The unsigned http(s) URL of ``key`` in the bucket (key percent-encoded as S3 does)."""
        path = quote(key, safe="/~")
        bucket = self.config.bucket
        if self.config.addressing_style == "virtual":
            return f"{self._scheme}://{bucket}.{self._netloc}/{path}"
        return f"{self._scheme}://{self._netloc}/{bucket}/{path}"

    def presign(self, url: object) -> str | None:
        """A presigned link for an ``s3://`` URL of the bucket; None for anything else.

        The key is everything after ``s3://bucket/``, as written (the AWS CLI's
        convention: not percent-decoded).
        """
        if not isinstance(url, str) or url[:5].lower() != "s3://":
            return None
        bucket, sep, key = url[5:].partition("/")
        if not sep or not key or bucket != self.config.bucket:
            return None
        request = self._request_cls(method="GET", url=self.object_url(key))
        self._auth_cls(self._credentials, "s3", self.config.region,
                       expires=self.config.ttl_s).add_auth(request)
        signed: str = request.url
        return signed

    def add_to(self, generation: dict[str, Any]) -> dict[str, Any]:
        """A copy of a Generation view with ``download_url`` on its s3 samples and final.

        The input is not changed (nothing signed can leak into anything that is stored).
        """
        out = dict(generation)
        samples = generation.get("samples")
        if isinstance(samples, list):
            out["samples"] = [self._linked(s) for s in samples]
        final = generation.get("final_asset")
        if isinstance(final, dict):
            out["final_asset"] = self._linked(final)
        return out

    def _linked(self, asset: Any) -> Any:
        if not isinstance(asset, dict):
            return asset
        link = self.presign(asset.get("url"))
        return asset if link is None else {**asset, "download_url": link}


def with_download_urls(generation: dict[str, Any], links: S3Links | None) -> dict[str, Any]:
    """``generation`` with download links when links are configured; else unchanged."""
    return generation if links is None else links.add_to(generation)


async def presigned(generations: list[dict[str, Any]],
                    links: S3Links | None) -> list[dict[str, Any]]:
    """:func:`with_download_urls` for route handlers: signing runs in the thread pool."""
    if links is None:
        return generations
    return await blocking(lambda: [links.add_to(g) for g in generations])
