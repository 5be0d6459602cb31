"""S3 stand-in for n8n runs: moto in server mode on a free loopback port.

n8n talks to it exactly as to MinIO (custom endpoint, path-style addressing, SigV4), so the
shipped workflow's S3 node is exercised for real; boto3 then checks what was stored.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError
from moto.server import ThreadedMotoServer

DEFAULT_BUCKET = "creativeflow-assets"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def parse_s3_url(url: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into (bucket, key); raise ValueError for anything else."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc or not parsed.path.lstrip("/"):
        raise ValueError(f"not an s3://bucket/key URL: {url!r}")
    return parsed.netloc, parsed.path.lstrip("/")


@dataclass
class S3Stub:
    """moto S3 server with the contract bucket; use as a context manager."""

    bucket: str = DEFAULT_BUCKET
    region: str = "us-east-1"
    access_key_id: str = "aigen-test-access-key"
    secret_access_key: str = "aigen-test-secret-key"
    _server: ThreadedMotoServer | None = field(default=None, repr=False)
    _endpoint: str = ""

    def start(self) -> S3Stub:
        # werkzeug logs every request at INFO; a throughput run would drown the output.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self._endpoint = f"http://{host}:{port}"
        self.client().create_bucket(Bucket=self.bucket)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """Connections to the endpoint are refused inside the block; state survives (moto
        keeps it in-process) and the server comes back on the same port afterwards."""
        port = int(self.endpoint.rsplit(":", 1)[1])
        self.stop()
        try:
            yield
        finally:
            self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            self._server.start()

    def __enter__(self) -> S3Stub:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        if not self._endpoint:
            raise RuntimeError("S3Stub is not started")
        return self._endpoint

    def client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )

    def get(self, url: str) -> bytes | None:
        """The object's bytes at an ``s3://`` URL, or None when there is no such object."""
        bucket, key = parse_s3_url(url)
        try:
            obj = self.client().get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "NoSuchBucket", "404"}:
                return None
            raise
        body: bytes = obj["Body"].read()
        return body

    def exists(self, url: str) -> bool:
        return self.get(url) is not None

    def png_size(self, url: str) -> tuple[int, int] | None:
        """(width, height) from the PNG header of the stored object; None if absent/not PNG."""
        data = self.get(url)
        if data is None or not data.startswith(PNG_SIGNATURE) or len(data) < 24:
            return None
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")

    def keys(self, prefix: str = "") -> list[str]:
        paginator = self.client().get_paginator("list_objects_v2")
        out: list[str] = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            out.extend(obj["Key"] for obj in page.get("Contents", []))
        return out
